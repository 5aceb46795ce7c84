pub mod prenorm;
