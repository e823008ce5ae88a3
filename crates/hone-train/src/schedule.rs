//! Learning-rate schedules with a linear warmup, as transformers'
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (`num_cycles = 0.5`) compute them: the factor of the
//! peak learning rate used by the optimizer step that follows `step` completed scheduler steps
//! (so the very first update of a warmed-up run uses a factor of 0, as in PyTorch's
//! `LambdaLR`).

use serde::{Deserialize, Serialize};

/// The shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The peak rate throughout.
    Constant,
    /// Linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Half a cosine from the peak to 0.
    Cosine,
}

/// A schedule over a known number of steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// Warmup steps from `warmup_steps` or `warmup_ratio` (rounded up, as transformers'
    /// `get_warmup_steps`).
    pub fn warmup_from(
        total_steps: usize,
        warmup_steps: Option<usize>,
        warmup_ratio: Option<f64>,
    ) -> usize {
        match (warmup_steps, warmup_ratio) {
            (Some(n), _) => n,
            (None, Some(r)) => (r * total_steps as f64).ceil() as usize,
            (None, None) => 0,
        }
    }

    /// The factor of `peak_lr` after `step` scheduler steps.
    pub fn factor(&self, step: usize) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < warmup {
            return step / warmup.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (step - warmup) / (total - warmup).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of the update that follows `step` scheduler steps.
    pub fn lr(&self, step: usize) -> f64 {
        self.peak_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            peak_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
        }
    }

    // Reference values: transformers 4.x `get_*_schedule_with_warmup(opt, 10, 110)` with lr 1,
    // read as `scheduler.get_last_lr()` after `step` calls to `scheduler.step()`.
    #[test]
    fn warmup_is_linear_from_zero_for_every_kind() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = schedule(kind);
            assert_eq!(s.lr(0), 0.0);
            assert_eq!(s.lr(1), 0.1);
            assert_eq!(s.lr(5), 0.5);
            assert_eq!(s.lr(10), 1.0);
        }
    }

    #[test]
    fn linear_and_cosine_decay_to_zero_at_the_last_step() {
        let lin = schedule(ScheduleKind::Linear);
        assert_eq!(lin.lr(60), 0.5);
        assert!((lin.lr(85) - 0.25).abs() < 1e-15);
        assert_eq!(lin.lr(110), 0.0);
        assert_eq!(lin.lr(200), 0.0);
        let cos = schedule(ScheduleKind::Cosine);
        assert!((cos.lr(60) - 0.5).abs() < 1e-15);
        // 0.5 * (1 + cos(pi * 0.25))
        assert!((cos.lr(35) - 0.853_553_390_593_273_7).abs() < 1e-12);
        assert!(cos.lr(110).abs() < 1e-15);
        assert_eq!(schedule(ScheduleKind::Constant).lr(109), 1.0);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        assert_eq!(Schedule::warmup_from(105, None, Some(0.1)), 11);
        assert_eq!(Schedule::warmup_from(100, None, Some(0.1)), 10);
        assert_eq!(Schedule::warmup_from(100, Some(3), None), 3);
        assert_eq!(Schedule::warmup_from(100, None, None), 0);
    }

    #[test]
    fn no_warmup_starts_at_the_peak() {
        let s = Schedule {
            kind: ScheduleKind::Linear,
            peak_lr: 2e-4,
            warmup_steps: 0,
            total_steps: 4,
        };
        assert_eq!(s.lr(0), 2e-4);
        assert_eq!(s.lr(2), 1e-4);
    }
}
