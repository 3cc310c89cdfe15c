"""The proposer contract suite (`weavelm.testing.proposer`), run against every registered proposer."""

from weavelm.testing import names
from weavelm.testing.proposer import ProposerContract

OPTIONS = {  # what the built-ins need besides num_speculative_tokens (a third party's: none assumed)
    "ngram": lambda self, target: {"prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "draft_model": lambda self, target: {"model": target},  # the target as its own draft
}

for _name in names("proposer"):
    globals()[f"TestContract_{_name}"] = type(f"TestContract_{_name}", (ProposerContract,),
                                             {"proposer": _name, "proposer_options": OPTIONS.get(_name,
                                                                                                 lambda s, t: {})})
