pub mod cosine;
