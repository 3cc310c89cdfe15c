"""The shipped executor contract, run against every registered executor."""

from weavelm.testing import names
from weavelm.testing.executor import ExecutorContract

for _name in names("executor"):
    globals()[f"TestExecutorContract_{_name}"] = type(f"TestExecutorContract_{_name}", (ExecutorContract,),
                                                      {"executor": _name})
