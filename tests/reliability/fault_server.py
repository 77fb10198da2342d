"""`packserve` with a test-only fault hook, for tests/reliability/test_fault.py:

    PACKSERVE_TEST_FAULT_TOKEN_ID=T python tests/reliability/fault_server.py serve <flags>

Any model forward whose input ids hold token T raises RuntimeError("injected fault: token T
was scheduled"). The engine fails the requests of the step whose forward raised and carries on
with the others, so a step that would run T (a prompt holding it, or a decode feeding it back
after sampling it) fails exactly its own requests.

The hook sits on the model's input embeddings, which every forward passes its input ids
through ([rows, tokens] for packed prefill, [seqs, 1] for decode), so it does not depend on
how the scheduler hands work to the runner. Padding ids (0) pass through the same embeddings,
so T must not be 0. The product knows nothing of this: the variable is read here and removed
before packserve starts. The engine runs in a spawned process, which imports this file again
(as `__mp_main__`): HOOK_ENV carries the token id there, and the hook is installed on import.
"""

from __future__ import annotations

import os
import sys
from typing import Any

FAULT_ENV = "PACKSERVE_TEST_FAULT_TOKEN_ID"
HOOK_ENV = "_FAULT_SERVER_TOKEN_ID"  # for the engine process; not a PACKSERVE_ setting


def install_fault_hook(token_id: int) -> None:
    """Make every model loaded through AutoModelForCausalLM fail on forwards that run
    `token_id`."""
    import torch
    from transformers import AutoModelForCausalLM

    if token_id <= 0:
        raise SystemExit(f"{FAULT_ENV}={token_id}: must be a real token id (0 is padding)")
    load = AutoModelForCausalLM.from_pretrained  # bound to the class: a plain callable

    def check(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = args[0] if args else kwargs.get("input")  # [R, L] token ids
        if isinstance(input_ids, torch.Tensor) and bool((input_ids == token_id).any()):
            raise RuntimeError(f"injected fault: token {token_id} was scheduled")

    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        model = load(*args, **kwargs)
        model.get_input_embeddings().register_forward_pre_hook(check, with_kwargs=True)
        return model

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]


def main() -> None:
    raw = os.environ.pop(FAULT_ENV, None)
    if raw is None:
        raise SystemExit(f"set {FAULT_ENV} to the token id whose steps should fail")
    install_fault_hook(int(raw))
    os.environ[HOOK_ENV] = raw

    from packserve.server.cli import main as packserve_main

    packserve_main(sys.argv[1:])


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__" and HOOK_ENV in os.environ:
    install_fault_hook(int(os.environ[HOOK_ENV]))
