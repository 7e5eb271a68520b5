"""hubkit's vLLM plugin: registers hubkit's native model implementations in vLLM's model registry.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in hubkit's pyproject, in
every process it starts (the API process, the engine core, its workers; inside Ray actors too), before it
resolves a model. Nothing heavy is imported here: the registry imports the model module only when a
checkpoint of that architecture is loaded.

``HUBKIT_VLLM_NEOX=transformers`` leaves GPT-NeoX to vLLM's own choice (its Transformers modeling backend),
e.g. to compare the two.
"""

from __future__ import annotations

import os

#: config.json architecture -> hubkit's implementation, as vLLM's lazy "module:Class" string.
NATIVE_MODELS = {"GPTNeoXForCausalLM": "hubkit.backends.vllm_neox:GPTNeoXForCausalLM"}
#: Set to "transformers" to keep vLLM's Transformers backend for GPT-NeoX.
NEOX_IMPLEMENTATION_ENV = "HUBKIT_VLLM_NEOX"


def register() -> None:
    """Registers hubkit's native models with vLLM (safe to call more than once)."""
    if os.environ.get(NEOX_IMPLEMENTATION_ENV, "native").strip().lower() == "transformers":
        return
    from vllm import ModelRegistry

    for architecture, implementation in NATIVE_MODELS.items():
        ModelRegistry.register_model(architecture, implementation)
