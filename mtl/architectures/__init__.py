"""Multi-task architectures: how the tasks share a network, by name (`build("mmoe", ...)`).

    model = mtl.architectures.build("mmoe", (16, 32, 1), heads, num_experts=4)

| name         | paper                            | what the tasks share                        |
|--------------|----------------------------------|---------------------------------------------|
| hps          | Caruana 1997 (hard sharing)      | one backbone; one head per task             |
| mmoe         | Ma et al., KDD 2018              | experts (backbone copies), a gate per task  |
| cgc          | Tang et al., RecSys 2020         | shared experts; each task also has its own  |
| ple          | Tang et al., RecSys 2020         | CGC stacked in levels, with shared gates    |
| dselect_k    | Hazimeh et al., NeurIPS 2021     | experts; each task's gate picks at most k   |
| cross_stitch | Misra et al., CVPR 2016          | a backbone per task, mixed by learnt units  |
| mtan         | Liu, Johns & Davison, CVPR 2019  | one trunk; each task attends to its stages  |

Every builder takes `input_shape`, `heads` (`{task: layer}`, each applied to that task's final
feature vector), a backbone name from `mtl.backbones` and its config, and the architecture's
options; it returns a `MultiTaskModel`. All but `hps` are built with
`MultiTaskModel.from_outputs(..., architecture=spec)`: variables are shared by the tasks whose
outputs depend on them (`mtl.sharing_report`), and `model.architecture` is the
`ArchitectureSpec`, whose `no_rep_reason` says why gradient_mode="rep" (the Gramian w.r.t. one
shared representation) is not defined for it. `model.architecture_args` is the builder's call,
every option included, and `model.architecture_heads` its heads: what `mtl.training.model_record`
records to rebuild the model.

Layer names are deterministic (`expert_0`, `gate_left`, `left_cross_stitch_1`, ...), so
checkpoints and exports of two builds with the same arguments match. Backbone copies build their
variables under their own name scope (`expert_0/conv_0/kernel`), so variable paths are unique.

The package, by what each module owns:
  spec       `ArchitectureSpec`, `Option` and the checks of a builder's arguments;
  layers     the Keras layers (gates, `ExpertMixture`, `CrossStitch`, `AttentionMask`);
  building   what every builder shares (layer names, backbone copies, the recorded call);
  experts    hps, mmoe, cgc, ple, dselect_k and their specs;
  layerwise  cross_stitch, mtan and their specs, and the layer-by-layer cloning of a backbone;
  registry   `ARCHITECTURES`, `get_spec` and `build`;
  probes     `gate_model` and `attention_model`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping  # noqa: F401 - importable from here as before the split

from mtl.architectures.experts import cgc, dselect_k, hps, mmoe, ple
from mtl.architectures.layers import (EPSILON, GATE_LAYERS, AttentionMask, CrossStitch,
                                      DSelectKGate, ExpertMixture, SoftmaxGate, smooth_step)
from mtl.architectures.layerwise import cross_stitch, mtan
from mtl.architectures.probes import attention_model, gate_model
from mtl.architectures.registry import ARCHITECTURES, build, get_spec
from mtl.architectures.spec import ArchitectureSpec, Option
from mtl.errors import UsageError, UsageTypeError, check_int  # noqa: F401 - as before the split
from mtl.model import MultiTaskModel  # noqa: F401 - as before the split

__all__ = [
    "ARCHITECTURES", "ArchitectureSpec", "AttentionMask", "CrossStitch", "DSelectKGate",
    "EPSILON", "ExpertMixture", "GATE_LAYERS", "Option", "SoftmaxGate", "attention_model",
    "build", "cgc", "cross_stitch", "dselect_k", "gate_model", "get_spec", "hps", "mmoe", "mtan",
    "ple", "smooth_step"]
