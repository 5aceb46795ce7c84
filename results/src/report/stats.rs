//! Statistics over the seeds of one configuration: a Student-t confidence interval for the
//! mean, and Welch's unequal-variance t-test for the difference of two configurations.
//!
//! Seeds are few (3 to 5), so intervals use the t distribution, not the normal one: with 3
//! seeds the 95% interval is 4.30 standard errors wide on each side, not 1.96.

use statrs::distribution::{ContinuousCDF, StudentsT};

/// Mean, sample standard deviation and 95% interval of n values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// With n - 1 in the denominator; `None` for a single value.
    pub std: Option<f64>,
    /// 95% confidence interval of the mean; `None` for a single value.
    pub ci95: Option<(f64, f64)>,
}

impl Summary {
    /// From moments already computed (by polars, over a group); `None` when n is 0.
    pub fn from_moments(n: usize, mean: Option<f64>, std: Option<f64>) -> Option<Self> {
        let mean = mean.filter(|_| n > 0)?;
        let std = std.filter(|s| n > 1 && s.is_finite());
        let ci95 = std.map(|s| {
            let half = t_quantile_975((n - 1) as f64) * s / (n as f64).sqrt();
            (mean - half, mean + half)
        });
        Some(Self { n, mean, std, ci95 })
    }
}

impl Summary {
    /// Of values (their mean and sample standard deviation); `None` for none.
    pub fn of(v: &[f64]) -> Option<Self> {
        let n = v.len();
        if n == 0 {
            return None;
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let std = (n > 1).then(|| {
            (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
        });
        Self::from_moments(n, Some(mean), std)
    }
}

/// Welch's t-test of `a - b`: the difference of the means, its 95% interval and the two-sided
/// p-value of "no difference".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    pub diff: f64,
    pub ci95: (f64, f64),
    pub p: f64,
    /// Welch-Satterthwaite degrees of freedom.
    pub df: f64,
}

/// Needs at least two values on each side and some spread; `None` otherwise (a t-test of
/// one seed, or of seeds that agree exactly, says nothing).
pub fn welch(a: &Summary, b: &Summary) -> Option<Comparison> {
    let (sa, sb) = (a.std?, b.std?);
    let (va, vb) = (sa * sa / a.n as f64, sb * sb / b.n as f64);
    let se2 = va + vb;
    if se2 <= 0.0 || !se2.is_finite() {
        return None;
    }
    let df = se2 * se2 / (va * va / (a.n - 1) as f64 + vb * vb / (b.n - 1) as f64);
    let se = se2.sqrt();
    let diff = a.mean - b.mean;
    let t = diff / se;
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let half = dist.inverse_cdf(0.975) * se;
    Some(Comparison {
        diff,
        ci95: (diff - half, diff + half),
        p: (2.0 * dist.sf(t.abs())).min(1.0),
        df,
    })
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom.
pub fn t_quantile_975(df: f64) -> f64 {
    StudentsT::new(0.0, 1.0, df)
        .expect("positive degrees of freedom")
        .inverse_cdf(0.975)
}

/// 2 P(T > t) for Student's t, by Simpson's rule over the density: a second computation of
/// the p-values, independent of statrs' incomplete beta function.
#[cfg(test)]
pub(crate) fn two_sided_p_by_quadrature(t: f64, df: f64) -> f64 {
    let ln_gamma = |x: f64| statrs::function::gamma::ln_gamma(x);
    let c = (ln_gamma((df + 1.0) / 2.0) - ln_gamma(df / 2.0)).exp()
        / (df * std::f64::consts::PI).sqrt();
    let f = |x: f64| c * (1.0 + x * x / df).powf(-(df + 1.0) / 2.0);
    let n = 10_000;
    let h = t / n as f64;
    let mut s = f(0.0) + f(t);
    for i in 1..n {
        s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    1.0 - 2.0 * s * h / 3.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean and sample standard deviation written out, independent of polars.
    fn summary(xs: &[f64]) -> Summary {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        Summary::from_moments(xs.len(), Some(mean), Some(var.sqrt())).unwrap()
    }

    #[test]
    fn t_quantiles_match_the_printed_tables() {
        // Student's t table, two-sided 95%: df 1 = 12.706, 2 = 4.303, 4 = 2.776, 30 = 2.042.
        for (df, t) in [(1.0, 12.7062), (2.0, 4.3027), (4.0, 2.7764), (30.0, 2.0423)] {
            assert!((t_quantile_975(df) - t).abs() < 1e-3, "df {df}");
        }
        // df = 1 is the Cauchy distribution: the quantile is tan(0.475 pi).
        let cauchy = (0.475 * std::f64::consts::PI).tan();
        assert!((t_quantile_975(1.0) - cauchy).abs() < 1e-6);
    }

    #[test]
    fn interval_of_three_seeds_by_hand() {
        // 3.0, 3.2, 3.4: mean 3.2, s = 0.2, half width 4.302653 * 0.2 / sqrt 3 = 0.496827.
        let s = summary(&[3.0, 3.2, 3.4]);
        assert!((s.mean - 3.2).abs() < 1e-12);
        assert!((s.std.unwrap() - 0.2).abs() < 1e-12);
        let (lo, hi) = s.ci95.unwrap();
        assert!((hi - 3.2 - 0.496827).abs() < 1e-5, "{hi}");
        assert!((3.2 - lo - 0.496827).abs() < 1e-5, "{lo}");
        let one = Summary::from_moments(1, Some(3.0), None).unwrap();
        assert_eq!((one.std, one.ci95), (None, None));
        assert_eq!(Summary::from_moments(0, None, None), None);
    }

    #[test]
    fn welch_with_two_seeds_each_has_two_degrees_of_freedom_and_a_closed_form_p() {
        // Equal variances, n = 2 each: df = (2v)^2 / (2 v^2) = 2, and for df = 2 the t
        // distribution has P(|T| > t) = 1 - t / sqrt(2 + t^2).
        let a = summary(&[3.0, 3.2]);
        let b = summary(&[3.5, 3.7]);
        let c = welch(&a, &b).unwrap();
        assert!((c.df - 2.0).abs() < 1e-12);
        assert!((c.diff + 0.5).abs() < 1e-12);
        // se = sqrt(0.02 / 2 + 0.02 / 2) = 0.141421; t = -3.535534.
        let t: f64 = 0.5 / 0.02f64.sqrt();
        let p = 1.0 - t / (2.0 + t * t).sqrt();
        assert!((c.p - p).abs() < 1e-9, "{} vs {p}", c.p);
        assert!((p - 0.071523).abs() < 1e-5);
        let half = 4.302653 * 0.02f64.sqrt();
        assert!((c.ci95.0 - (-0.5 - half)).abs() < 1e-5);
        assert!((c.ci95.1 - (-0.5 + half)).abs() < 1e-5);
    }

    #[test]
    fn welch_with_unequal_variances_by_hand() {
        // a = 1, 2, 3, 4 (mean 2.5, var 5/3); b = 2, 4, 6 (mean 4, var 4).
        // va = 5/12, vb = 4/3, se^2 = 7/4, df = (7/4)^2 / ((5/12)^2/3 + (4/3)^2/2) = 3.2347,
        // t = -1.5 / sqrt(7/4) = -1.133893.
        let c = welch(&summary(&[1.0, 2.0, 3.0, 4.0]), &summary(&[2.0, 4.0, 6.0])).unwrap();
        let df = (49.0 / 16.0) / ((25.0 / 144.0) / 3.0 + (16.0 / 9.0) / 2.0);
        assert!((c.df - df).abs() < 1e-12);
        assert!((c.df - 3.2347).abs() < 1e-4);
        // p from the t CDF integrated numerically (Simpson, independent of statrs).
        let p = super::two_sided_p_by_quadrature(1.5 / 1.75f64.sqrt(), df);
        assert!((c.p - p).abs() < 1e-6, "{} vs {p}", c.p);
        // Seeds that agree exactly, or one seed, give no test.
        assert_eq!(welch(&summary(&[1.0, 1.0]), &summary(&[1.0, 1.0])), None);
        let one = Summary::from_moments(1, Some(1.0), None).unwrap();
        assert_eq!(welch(&one, &summary(&[1.0, 2.0])), None);
    }
}
