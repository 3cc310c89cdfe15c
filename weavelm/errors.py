"""Typed errors. Every error a user can cause is a WeaveError whose message names the field and the fix."""

from __future__ import annotations


class WeaveError(Exception):
    """Base of every error weavelm raises on purpose."""


class ConfigError(WeaveError, ValueError):
    """An engine configuration (YAML, keyword overrides, --set) is invalid.

    `errors` holds one `(yaml_path, message)` pair per problem; all are reported together.
    """

    def __init__(self, errors: list[tuple[str, str]] | str):
        if isinstance(errors, str):
            errors = [("", errors)]
        self.errors = errors
        lines = [f"{path}: {msg}" if path else msg for path, msg in errors]
        super().__init__("invalid engine configuration:\n  " + "\n  ".join(lines))


class PluginError(WeaveError, LookupError):
    """A plugin is unknown, failed to load, or two distributions claim the same name."""


class LoadError(WeaveError, OSError):
    """Weights or a model directory cannot be loaded: missing, truncated, corrupt or unsafe."""


class RequestError(WeaveError, ValueError):
    """A request (prompt or sampling parameters) is invalid. The engine keeps serving other requests."""


class MultiModalInputError(RequestError):
    """A request's images (or other media) are invalid: undecodable, too large, too many, a URL that is not
    fetched. Only that request fails."""


class EngineError(WeaveError, RuntimeError):
    """The engine itself failed (a worker died, the core process exited)."""


class EngineDeadError(EngineError):
    """A process the engine depends on (a worker rank, the engine core) died or broke; the engine cannot go on.
    The message names the process and, where known, its exit code or signal and traceback."""


class LoRAError(RequestError):
    """A LoRA adapter cannot serve a request: unknown name, missing or unsafe files, a rank above
    `lora.max_lora_rank`, a module the model lacks, or tensors whose shapes do not fit the model. Only the request
    asking for that adapter fails."""


class MissingExtraError(WeaveError, ImportError):
    """An optional dependency is not installed. The message names the package, what needs it and the exact
    `pip install 'weavelm[EXTRA]'` command; `extra` is that extra's name."""

    def __init__(self, module: str, extra: str, needed_for: str):
        self.module, self.extra = module, extra
        super().__init__(f"{needed_for} needs the `{module}` package, which is not installed; install it with "
                         f"pip install 'weavelm[{extra}]'")


def require_extra(module: str, extra: str, needed_for: str) -> None:
    """Raise MissingExtraError unless `module` can be imported (checked without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtraError(module, extra, needed_for)
