"""The benchmark container shared by TOFU, MUSE-style QA and the built-in synthetic benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field

# A short pool of refusal answers, the default target for the targeted MOX variant when a
# benchmark ships none of its own.
DEFAULT_IDK = (
    "I don't know.",
    "I have no information about that.",
    "I am not sure about that.",
    "I can't answer that question.",
    "That is not something I know.",
    "I don't have an answer to that.",
    "I'm afraid I don't know.",
    "I have no idea.",
)


@dataclass
class UnlearnBenchmark:
    """Rows in TOFU's schema: question, answer and, in the *_perturbed lists, paraphrased_answer and
    perturbed_answer (a list of wrong answers).

    forget / retain     training rows of the forget and retain sets
    holdout             rows of the same kind never trained on
    forget_perturbed    forget rows with paraphrased and perturbed answers (truth ratio)
    retain_perturbed    evaluation subset of retain with paraphrased and perturbed answers
    extra_evals         name -> rows with question, answer, perturbed_answer (TOFU: real_authors, world_facts)
    full                rows the reference model is trained on
    idk                 target answers ("I don't know" replies) for the targeted variant
    """

    name: str
    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    forget_perturbed: list[dict]
    retain_perturbed: list[dict]
    extra_evals: dict[str, list[dict]] = field(default_factory=dict)
    full: list[dict] = field(default_factory=list)
    idk: list[str] = field(default_factory=lambda: list(DEFAULT_IDK))

    def sizes(self) -> dict[str, int]:
        """Row count of every split (extra evals by name)."""
        out = {k: len(getattr(self, k)) for k in ("full", "forget", "retain", "holdout", "forget_perturbed",
                                                  "retain_perturbed")}
        out.update({k: len(v) for k, v in self.extra_evals.items()})
        return out
