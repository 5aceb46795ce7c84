pub mod gelu;
pub mod swiglu;

/// Hidden width for a multiplier of d_model, rounded to a multiple of 8 (kernel-friendly)
/// and never below 8.
pub(crate) fn hidden_width(mult: f64, d_model: usize) -> usize {
    (((mult * d_model as f64) / 8.0).round() as usize).max(1) * 8
}

pub(crate) fn check_mult(mult: f64) -> Result<(), String> {
    if mult.is_finite() && mult > 0.0 {
        Ok(())
    } else {
        Err(format!("mult must be a positive number, got {mult}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hidden_width_rounds_to_multiples_of_eight() {
        assert_eq!(super::hidden_width(8.0 / 3.0, 64), 168); // 170.7 -> 21.3 x 8
        assert_eq!(super::hidden_width(4.0, 64), 256);
        assert_eq!(super::hidden_width(0.01, 64), 8);
    }
}
