pub mod cosine;
pub mod trapezoid;
