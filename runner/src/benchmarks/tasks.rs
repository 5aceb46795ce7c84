//! The tasks: how each file's items become prompts, and what each reports. The formats are
//! those of `../shared/data/eval` (llm-foundry's local-eval JSONL and a HellaSwag
//! conversion); the prompts are lm-evaluation-harness's.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    HellaSwag,
    ArcEasy,
    ArcChallenge,
    WinoGrande,
    Piqa,
    Lambada,
    OpenBookQa,
    BoolQ,
    Copa,
}

/// How a task's items are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `query`, `choices`, `gold`: each choice (after a space) as a continuation of the
    /// context; acc by summed log-likelihood, acc_norm by log-likelihood per byte of the
    /// choice. `answer` puts "\nAnswer:" after the query (ARC, BoolQ), as the harness's
    /// prompts do.
    Choice { answer: bool },
    /// WinoGrande: `context_options`, `continuation`, `gold`; partial scoring, the
    /// log-likelihood of the shared continuation after each option.
    Partial,
    /// LAMBADA: `context`, `continuation` (the last word); accuracy of greedy decoding and
    /// perplexity of the continuation.
    LastWord,
}

impl Task {
    pub const ALL: [Task; 9] = [
        Task::HellaSwag,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::WinoGrande,
        Task::Piqa,
        Task::Lambada,
        Task::OpenBookQa,
        Task::BoolQ,
        Task::Copa,
    ];

    /// The name written in a sweep file.
    pub fn name(self) -> &'static str {
        match self {
            Task::HellaSwag => "HellaSwag",
            Task::ArcEasy => "ArcEasy",
            Task::ArcChallenge => "ArcChallenge",
            Task::WinoGrande => "WinoGrande",
            Task::Piqa => "Piqa",
            Task::Lambada => "Lambada",
            Task::OpenBookQa => "OpenBookQa",
            Task::BoolQ => "BoolQ",
            Task::Copa => "Copa",
        }
    }

    /// The name in metric names (`bench/<metric>/acc`).
    pub fn metric(self) -> &'static str {
        match self {
            Task::HellaSwag => "hellaswag",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::WinoGrande => "winogrande",
            Task::Piqa => "piqa",
            Task::Lambada => "lambada",
            Task::OpenBookQa => "openbook_qa",
            Task::BoolQ => "boolq",
            Task::Copa => "copa",
        }
    }

    /// The task's file in a benchmark folder (`benchmark_dir`).
    pub fn file(self) -> &'static str {
        match self {
            Task::HellaSwag => "hellaswag_val.jsonl",
            Task::ArcEasy => "arc_easy.jsonl",
            Task::ArcChallenge => "arc_challenge.jsonl",
            Task::WinoGrande => "winogrande.jsonl",
            Task::Piqa => "piqa.jsonl",
            Task::Lambada => "lambada_openai.jsonl",
            Task::OpenBookQa => "openbook_qa.jsonl",
            Task::BoolQ => "boolq.jsonl",
            Task::Copa => "copa.jsonl",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Task::ArcEasy | Task::ArcChallenge | Task::BoolQ => Kind::Choice { answer: true },
            Task::HellaSwag | Task::Piqa | Task::OpenBookQa | Task::Copa => {
                Kind::Choice { answer: false }
            }
            Task::WinoGrande => Kind::Partial,
            Task::Lambada => Kind::LastWord,
        }
    }

    /// The accuracy of guessing: one over the number of choices (LAMBADA: 0).
    pub fn chance(self) -> f64 {
        match self {
            Task::WinoGrande | Task::Piqa | Task::BoolQ | Task::Copa => 0.5,
            Task::Lambada => 0.0,
            _ => 0.25,
        }
    }

    /// The task written as `name` in a sweep file.
    pub fn parse(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Every task's sweep-file name, for error messages.
    pub fn names() -> String {
        Task::ALL.map(Task::name).join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_has_its_own_names_and_file() {
        for (i, a) in Task::ALL.iter().enumerate() {
            assert_eq!(Task::parse(a.name()), Some(*a));
            for b in &Task::ALL[..i] {
                assert_ne!(a.metric(), b.metric());
                assert_ne!(a.file(), b.file());
            }
        }
        // The files of ../shared/data/eval.
        assert_eq!(Task::ArcChallenge.file(), "arc_challenge.jsonl");
        assert_eq!(Task::Copa.file(), "copa.jsonl");
        assert_eq!(Task::parse("Hellaswag"), None);
    }
}
