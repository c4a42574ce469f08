"""Inference backends of a model replica (PyTorch, ONNX Runtime, OpenVINO) and ``ce-ray export``.

============  ===============================================  ===============================================
backend       what a replica runs                              precision (``serve.precision``)
============  ===============================================  ===============================================
``torch``     the CrossEncoder's PyTorch module                fp32, bf16 (CPU or GPU), fp16 (GPU)
``onnx``      ONNX Runtime (CPU) on ``onnx/<model_file>``      the graph's own: fp32, an O1-O4 graph, int8
``openvino``  OpenVINO (CPU) on ``openvino/<model_file>``      fp32 or bf16 (the CPU plugin's precision hint)
============  ===============================================  ===============================================

Every backend takes the features :class:`~ce_ray.serving.batching.PairScorer` builds (``input_ids``,
``attention_mask``, ``token_type_ids`` as torch tensors) and returns an object with ``.logits``, so batching,
truncation and scores are the same code for all three.

``ce-ray export MODEL --backend onnx|openvino [--optimize O1..O4] [--quantize ...]`` writes sentence-transformers'
layout and file names (``onnx/model.onnx``, ``onnx/model_O3.onnx``, ``onnx/model_qint8_avx512_vnni.onnx``,
``openvino/openvino_model.xml``), so ``CrossEncoder(path, backend="onnx", model_kwargs={"file_name": ...})`` loads
the same files where optimum is installed. It does not call sentence-transformers' ``export_*`` helpers: those
need optimum-onnx / optimum-intel, which require transformers < 4.58 / < 5.6, and ce-ray runs on transformers 5.x.
It calls what those helpers call, with optimum's settings: ``torch.onnx.export``;
``onnxruntime.transformers.optimizer`` for the O1-O4 levels; ``onnxruntime.quantization.quantize_dynamic`` with
the arm64/avx2/avx512/avx512_vnni configurations of optimum's ``AutoQuantizationConfig``; ``openvino.convert_model``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import warnings
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ce_ray.config import ConfigError, ServeConfig
from ce_ray.modeling import export_model, is_model_dir, is_remote, locate_model
from ce_ray.runtime import cpu_flags, native_bf16

if TYPE_CHECKING:
    from sentence_transformers.cross_encoder import CrossEncoder

__all__ = [
    "BACKEND_FILES",
    "OPTIMIZE_LEVELS",
    "QUANTIZE_CONFIGS",
    "check_backend",
    "export_backend",
    "load_model",
    "resolve_backend",
    "serving_precision",
]

logger = logging.getLogger(__name__)

# backend -> (subfolder, default file, the module it needs, the ce-ray extra that installs it)
BACKEND_FILES = {
    "onnx": ("onnx", "model.onnx", "onnxruntime", "onnx"),
    "openvino": ("openvino", "openvino_model.xml", "openvino", "openvino"),
}
OPTIMIZE_LEVELS = ("O1", "O2", "O3", "O4")
# optimum's AutoQuantizationConfig (dynamic): weight type of each CPU target; activations uint8, symmetric int
# weights, per channel, full range, MatMul and Add quantized. "qint8" is the one for this CPU.
QUANTIZE_CONFIGS = {"arm64": "QInt8", "avx2": "QUInt8", "avx512": "QInt8", "avx512_vnni": "QInt8"}
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------------------------
# serving: check (before Ray), load (in the replica)
# --------------------------------------------------------------------------------------------
def resolve_backend(cfg: ServeConfig, device: str) -> str:
    """``serve.backend`` on a replica of ``device``: ``auto`` = openvino on CPU where OpenVINO is installed, else torch."""
    if cfg.backend != "auto":
        return cfg.backend
    return "openvino" if device == "cpu" and importlib.util.find_spec("openvino") is not None else "torch"


def serving_precision(cfg: ServeConfig, device: str) -> str:
    """The precision a replica computes in: ``serve.precision``, with ``auto`` = fp16 on GPU, and on CPU bf16 where
    it is native (:func:`~ce_ray.runtime.native_bf16`), else fp32; for onnx, what the graph holds (int8 for a
    quantized file, fp16 for O4, else fp32)."""
    if resolve_backend(cfg, device) == "onnx":
        name = cfg.model_file or BACKEND_FILES["onnx"][1]
        return "int8" if "int8" in name else "fp16" if "_O4" in name else "fp32"
    if cfg.precision != "auto":
        return cfg.precision
    if device == "cuda":
        return "fp16"
    return "bf16" if native_bf16(use_gpu=False) else "fp32"


def check_backend(cfg: ServeConfig, model: str) -> None:
    """Fail before any Ray work when ``serve.backend`` cannot serve ``model`` (``serve.model`` or one of
    ``serve.models``): its engine is not installed,
    or ``serve.model_file`` is not in the model's onnx/ or openvino/ folder. A local model without the folder is
    fine: the replica exports it (plain ONNX) when it starts. Remote models are checked by the replica.

    Raises:
        ConfigError: naming ``serve.backend`` or ``serve.model_file`` and the fix.
    """
    backend = resolve_backend(cfg, "cuda" if cfg.num_gpus > 0 else "cpu")
    if backend == "torch":
        return
    sub, default, module, extra = BACKEND_FILES[backend]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"serve.backend: {backend} needs {module}, which is not installed; pip install 'ce-ray[{extra}]' "
            "(or serve.backend: torch)"
        )
    path = locate_model(model)
    if is_remote(path) or not os.path.isdir(path):
        return  # a remote model or hub id: the replica downloads it and checks
    wanted = os.path.join(path, sub, cfg.model_file or default)
    if os.path.isfile(wanted):
        return
    if cfg.model_file is not None:
        present = sorted(os.listdir(os.path.join(path, sub))) if os.path.isdir(os.path.join(path, sub)) else []
        have = f"it has {', '.join(present)}" if present else f"it has no {sub}/ folder"
        raise ConfigError(
            f"serve.model_file: {wanted} does not exist ({have}); write it with `ce-ray export {path} --backend "
            f"{backend} ...`, or leave serve.model_file out to serve {sub}/{default}"
        )
    if not is_model_dir(path):
        raise ConfigError(
            f"serve.backend: {path} has no {sub}/{default} and no PyTorch weights to export one from; "
            f"run `ce-ray export MODEL --backend {backend} --output {path}` or use serve.backend: torch"
        )


def load_model(cfg: ServeConfig, path: str, device: str, precision: str) -> tuple[CrossEncoder, Any]:
    """The CrossEncoder (tokenizer, activation, config, max length) and the network a replica scores with.

    torch: the CrossEncoder's own module in ``precision``. onnx/openvino: the exported file (exported here, to
    plain ONNX in a temporary folder, when the model has none).

    Raises:
        ValueError: a model that is not one Transformer module with a sequence-classification head.
    """
    import torch
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder import CrossEncoder

    ce = CrossEncoder(path, device=device)
    plain = len(ce) == 1 and isinstance(ce[0], Transformer)
    if not plain or ce[0].transformer_task != "sequence-classification":
        raise ValueError(
            f"{path}: ce-ray serves sequence-classification CrossEncoders (one Transformer module); "
            f"this model has modules {[type(m).__name__ for m in ce]}"
        )
    backend = resolve_backend(cfg, device)
    if backend == "torch":
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        return ce, ce.model.to(dtype).eval()

    sub, default, _, _ = BACKEND_FILES[backend]
    file = os.path.join(path, sub, cfg.model_file or default)
    threads = max(1, round(cfg.num_cpus))
    if not os.path.isfile(file):
        if cfg.model_file is not None:
            raise FileNotFoundError(f"serve.model_file: {file} does not exist")
        logger.warning(
            "%s has no %s/%s: exporting it for this replica (run `ce-ray export %s --backend %s` once to skip this)",
            path, sub, default, path, backend,
        )
        tmp = tempfile.mkdtemp(prefix="ce_ray_export_")
        file = os.path.join(tmp, default)
        if backend == "onnx":
            _export_onnx(ce, file)
        else:
            _export_openvino(ce, file, tmp)
    config = ce.model.config
    net = _OnnxNet(file, threads, config) if backend == "onnx" else _OpenVinoNet(file, threads, precision, config)
    return ce, net


class _OnnxNet:
    """An ONNX Runtime session that takes PairScorer's torch features and returns ``.logits`` (a torch tensor)."""

    backend = "onnx"

    def __init__(self, file: str, threads: int, config):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # as torch.set_num_threads(serve.num_cpus) for the torch backend
        options.inter_op_num_threads = 1
        self.file = file
        self.session = ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "logits" if "logits" in outputs else outputs[0]
        self.config = config

    def __call__(self, **features):
        import torch

        feeds = {name: _feature(features, name).numpy() for name in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run([self.output], feeds)[0]))


class _OpenVinoNet:
    """An OpenVINO CPU model that takes PairScorer's torch features and returns ``.logits`` (a torch tensor)."""

    backend = "openvino"

    def __init__(self, file: str, threads: int, precision: str, config):
        import openvino as ov

        self.file = file
        self.model = ov.Core().compile_model(
            file,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
            },
        )
        self.request = self.model.create_infer_request()
        self.lock = threading.Lock()  # one infer request: Serve's health check may call from another thread
        self.inputs = [port.any_name for port in self.model.inputs]
        names = [port.get_names() for port in self.model.outputs]
        self.output = next((i for i, n in enumerate(names) if "logits" in n), 0)
        self.config = config

    def __call__(self, **features):
        import torch

        feeds = {name: _feature(features, name).numpy() for name in self.inputs}
        with self.lock:
            logits = self.request.infer(feeds)[self.model.outputs[self.output]].copy()
        return SimpleNamespace(logits=torch.from_numpy(logits))


def _feature(features: dict, name: str):
    """A model input; a graph that wants token_type_ids from a tokenizer without them gets zeros."""
    if name == "token_type_ids" and name not in features:
        import torch

        return torch.zeros_like(features["input_ids"])
    return features[name].cpu()


# --------------------------------------------------------------------------------------------
# ce-ray export
# --------------------------------------------------------------------------------------------
def export_backend(
    model: str, backend: str, optimize: str | None = None, quantize: str | None = None, output: str | None = None
) -> str:
    """Export ``model`` for ``serve.backend: <backend>``; return the written file (its name is ``serve.model_file``).

    Writes ``onnx/model.onnx`` (kept when it exists), plus ``onnx/model_<O1..O4>.onnx`` for ``optimize`` and
    ``onnx/model[_<level>]_<qint8|quint8>_<target>.onnx`` for ``quantize``; or ``openvino/openvino_model.xml``
    (+ .bin). Into the model directory, or into ``output`` (a new directory: a copy of the model plus the
    subfolder). Atomically: everything is written in a temporary folder next to the target and renamed into place,
    so an interrupted export leaves the model as it was.

    Args:
        model: a local CrossEncoder directory, or a train/tune output_dir (its best/ or final/).
        backend: ``onnx`` or ``openvino``.
        optimize: onnx only: ONNX Runtime graph optimisation level as optimum defines them. O1 basic, O2 extended
            + transformer fusions, O3 O2 + GELU approximation, O4 O3 + fp16 (for GPUs; slow on most CPUs).
        quantize: onnx only: dynamic int8 quantization for a CPU target, ``arm64``, ``avx2``, ``avx512``,
            ``avx512_vnni``, or ``qint8`` = the target of this CPU.
        output: write a new model directory here instead of into ``model``.

    Raises:
        ConfigError: a bad option or model, naming the option and the fix.
    """
    sub, default, module, extra = BACKEND_FILES.get(backend, (None, None, None, None))
    if sub is None:
        raise ConfigError(f"--backend: {backend!r}; use onnx or openvino")
    if importlib.util.find_spec(module) is None or (backend == "onnx" and importlib.util.find_spec("onnx") is None):
        raise ConfigError(f"--backend: {backend} needs {module}; pip install 'ce-ray[{extra}]'")
    if backend == "openvino" and optimize:
        raise ConfigError("--optimize: ONNX Runtime's graph levels, for --backend onnx only; OpenVINO optimises when a "
                          "replica compiles the model")
    if backend == "openvino" and quantize:
        raise ConfigError(
            "--quantize: for --backend onnx only (OpenVINO int8 needs nncf's static quantization with calibration "
            "data, which ce-ray does not do); use --backend onnx --quantize qint8"
        )
    if optimize is not None and optimize not in OPTIMIZE_LEVELS:
        raise ConfigError(f"--optimize: {optimize!r}; use one of {', '.join(OPTIMIZE_LEVELS)}")
    target = _quantize_target(quantize) if quantize is not None else None
    try:
        src = locate_model(model)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"MODEL: {exc}") from None
    if is_remote(src) or not is_model_dir(src):
        raise ConfigError(f"MODEL: {model} is not a local model directory (config.json and weights)")
    dest = os.path.abspath(output or src)
    if output and os.path.exists(output) and os.listdir(output):
        raise ConfigError(f"--output: {output} exists and is not empty; give a new directory, or MODEL to add to it")

    from sentence_transformers.cross_encoder import CrossEncoder

    ce = CrossEncoder(src, device="cpu")
    parent = os.path.dirname(dest.rstrip(os.sep)) or "."
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".ce-ray-export-") as tmp:
        root = os.path.join(tmp, "model")
        if output:
            export_model(src, root)  # the model files, without training state
        work = os.path.join(root, sub)
        os.makedirs(work, exist_ok=True)
        existing = os.path.join(src, sub)
        if os.path.isdir(existing):  # keep what was exported before
            shutil.copytree(existing, work, dirs_exist_ok=True, copy_function=_link_or_copy)
        if backend == "openvino":
            written = os.path.join(work, default)
            _export_openvino(ce, written, tmp)
        else:
            written = base = os.path.join(work, default)
            if not os.path.isfile(base):
                _export_onnx(ce, base)
            if optimize:
                written = os.path.join(work, f"model_{optimize}.onnx")
                _optimize_onnx(base, written, optimize, ce.model.config)
            if target:
                stem = os.path.basename(written)[: -len(".onnx")]
                quantized = os.path.join(work, f"{stem}_{QUANTIZE_CONFIGS[target].lower()}_{target}.onnx")
                _quantize_onnx(written, quantized, target)
                written = quantized
        name = os.path.basename(written)
        if output:
            os.rename(root, dest)
        else:  # swap the new subfolder in: rename the old one away, the new one into place
            target_dir = os.path.join(dest, sub)
            if os.path.exists(target_dir):
                os.rename(target_dir, os.path.join(tmp, "previous"))
            os.rename(work, target_dir)
    return os.path.join(dest, sub, name)


def _quantize_target(quantize: str) -> str:
    if quantize == "qint8":
        import platform

        flags = cpu_flags()
        if platform.machine() in ("aarch64", "arm64"):
            return "arm64"
        return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"
    if quantize not in QUANTIZE_CONFIGS:
        raise ConfigError(f"--quantize: {quantize!r}; use qint8 (this CPU's) or one of {', '.join(QUANTIZE_CONFIGS)}")
    return quantize


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _export_onnx(ce: CrossEncoder, file: str) -> None:
    """The CrossEncoder's network as ONNX (fp32, opset 17), dynamic in batch size and sequence length."""
    import inspect

    import torch

    tokenizer = ce.tokenizer
    net = ce.model.float().eval().cpu()
    # in forward()'s order: the exporter names the traced inputs by position
    names = [n for n in inspect.signature(net.forward).parameters if n in _INPUTS and n in tokenizer.model_input_names]
    sample = tokenizer(["a query", "a longer query here"], ["a document", "another document that is longer"],
                       padding=True, return_tensors="pt")
    dynamic = {name: {0: "batch_size", 1: "sequence_length"} for name in names}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on Python branches (padding, causal masks) that an encoder's graph does not depend on
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            net,
            (),
            file,
            kwargs={name: sample[name] for name in names},
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**dynamic, "logits": {0: "batch_size"}},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, the graph optimum also writes
        )


def _optimize_onnx(src: str, dst: str, level: str, config) -> None:
    """optimum's O1-O4 (``AutoOptimizationConfig``) with ONNX Runtime's transformer optimizer."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    model_type = config.model_type if config.model_type in MODEL_TYPES else "bert"  # BERT-like encoders fuse as bert
    options = FusionOptions(model_type)
    options.enable_embed_layer_norm = False  # as optimum: that fusion does not quantize
    options.enable_gelu_approximation = level in ("O3", "O4")
    optimized = optimize_model(
        src,
        model_type=model_type,
        num_heads=getattr(config, "num_attention_heads", 0),
        hidden_size=getattr(config, "hidden_size", 0),
        opt_level=1 if level == "O1" else 2,
        optimization_options=options,
        use_gpu=False,
        only_onnxruntime=level == "O1",
    )
    if level == "O4":
        optimized.convert_float_to_float16(keep_io_types=True)
    optimized.save_model_to_file(dst)


def _quantize_onnx(src: str, dst: str, target: str) -> None:
    """Dynamic int8 quantization with optimum's ``AutoQuantizationConfig.<target>(is_static=False)`` settings."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul", "Add"],
        per_channel=True,
        reduce_range=False,
        weight_type=getattr(QuantType, QUANTIZE_CONFIGS[target]),
        extra_options={
            "WeightSymmetric": True,
            "ActivationSymmetric": False,
            "DefaultTensorType": onnx.TensorProto.FLOAT,  # fused (O2+) graphs hide some types from shape inference
        },
    )


def _export_openvino(ce: CrossEncoder, file: str, scratch: str) -> None:
    """The network as OpenVINO IR (fp32 weights; the precision is chosen when a replica compiles it)."""
    import openvino as ov

    onnx_file = os.path.join(scratch, "for_openvino.onnx")
    _export_onnx(ce, onnx_file)
    ov.save_model(ov.convert_model(onnx_file), file, compress_to_fp16=False)
