pub mod adamw;
pub mod muon;
pub mod normuon;
