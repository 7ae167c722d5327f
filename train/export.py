"""python -m train.export RUN_DIR --format hf|hf-nvfp4|peft --out DIR [--iteration N] [--tokenizer DIR] [--device cpu|cuda]

Exports the model of a run directory's latest (or given) checkpoint:

    hf        config.json + safetensors in bf16 that transformers' AutoModelForCausalLM loads.
              A QAD run gives its student's trained weights, quantizers dropped; a LoRA
              fine-tuning run gives the base with the adapters merged (train.lora.merge_lora).
    hf-nvfp4  a QAD run (quant.recipe nvfp4 or nvfp4_mlp_only) as modelopt's unified HF
              checkpoint: packed FP4 weights, E4M3 block scales, weight_scale_2/input_scale from
              the trained amax, hf_quant_config.json (TensorRT-LLM, vLLM, SGLang read it).
              Runs on CPU (modelopt's export packs NVFP4 in plain PyTorch; our CPU NVFP4
              backend covers the fake quantization) or on a GPU with --device cuda.
    peft      a LoRA fine-tuning run's adapters alone, as peft writes them: adapter_config.json
              (base_model_name_or_path = the run's model.hf_checkpoint, r, lora_alpha,
              target_modules, lora_dropout) + adapter_model.safetensors (fp32, peft's key names
              base_model.model.<HF module>.lora_A.weight / lora_B.weight); loads with
              PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), DIR).

Every format also gets what serving stacks read beside the weights (train/serving.py): the
tokenizer files of the run's model.hf_checkpoint (or of --tokenizer DIR; a pretraining run from
a registry model records none, and the export then says so), bos/eos/pad ids in config.json and
a generation_config.json (hf, hf-nvfp4), files 0644 under umask 022.

How hf-nvfp4 is built: our student (quantizers restored from quantizer_state.pt, weights and
amax from the DCP checkpoint) -> its full-precision weights saved as an HF directory ->
transformers' model loaded from it and quantized with the same recipe -> our amax values
copied onto its quantizers (HF names = "model." + ours; llama and qwen3 families) ->
modelopt.torch.export.export_hf_checkpoint. Peak memory: about twice the fp32 model.

The output directory appears complete or not at all: everything is written to DIR.tmp and
renamed at the end. Errors (no checkpoint, unknown iteration, DIR exists, a run that was not
quantized asked for hf-nvfp4, a run without LoRA asked for peft, a --tokenizer directory
without tokenizer files): one `error:` line, exit 2, before any model is built.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from train.serving import add_serving_files

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig

log = logging.getLogger("train")
FORMATS = ("hf", "hf-nvfp4", "peft")
NVFP4_RECIPES = ("nvfp4", "nvfp4_mlp_only")
EXIT_USAGE = 2


class ExportError(ValueError):
    """Bad input to the export: the message names the run dir, file or option."""


@dataclass
class Source:
    checkpoint: Path  # .../checkpoints/<model>/iter_XXXXXXX
    cfg: object  # the resolved config of the run (config.yaml in the checkpoint)
    quantizers: dict | None  # quantizer_state.pt, or None when the student was not quantized


def find_checkpoint(run_dir: Path, iteration: int | None) -> Path:
    """The latest (tracker) or the given iteration's checkpoint of a run directory."""
    from train.launch.rundir import TRACKER_FILE, checkpoint_dir_name, read_tracker

    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    trackers = sorted(run_dir.glob(f"checkpoints/*/{TRACKER_FILE}"))
    if not trackers:
        raise ExportError(f"{run_dir} has no checkpoints (no checkpoints/<model>/{TRACKER_FILE}); "
                          "is it a run directory, and did the run save?")
    if len(trackers) > 1:
        raise ExportError(f"{run_dir} holds checkpoints of several models: "
                          f"{', '.join(str(t.parent.name) for t in trackers)}")
    directory = trackers[0].parent
    iteration = read_tracker(directory) if iteration is None else iteration
    checkpoint = directory / checkpoint_dir_name(iteration)
    if not checkpoint.is_dir():
        available = sorted(p.name for p in directory.glob("iter_*") if p.is_dir())
        raise ExportError(f"--iteration {iteration}: {checkpoint} does not exist (available: {', '.join(available)})")
    if not (checkpoint / "config.yaml").is_file():
        raise ExportError(f"{checkpoint} has no config.yaml (written by an older version?): cannot rebuild the model")
    return checkpoint


def read_source(run_dir: Path, iteration: int | None, export_format: str) -> Source:
    from omegaconf import OmegaConf

    from train.config import to_job_config
    from train.quant.student import load_quantizer_state

    checkpoint = find_checkpoint(run_dir, iteration)
    cfg = to_job_config(OmegaConf.load(checkpoint / "config.yaml"))
    quantizers = load_quantizer_state(checkpoint)
    if export_format == "hf-nvfp4":
        recipe = quantizers["recipe"] if quantizers else None
        if recipe not in NVFP4_RECIPES:
            raise ExportError(f"--format hf-nvfp4 needs a QAD run quantized with {' or '.join(NVFP4_RECIPES)}; "
                              f"{checkpoint} is a {cfg.job} run" + (f" with recipe {recipe}" if recipe else
                                                                     " without quantizer state"))
        from train.models.family import SPECS, family_spec

        family = model_args(cfg).family
        if not family_spec(family).nvfp4_export:
            supported = " and ".join(name for name, spec in SPECS.items() if spec.nvfp4_export)
            raise ExportError(f"--format hf-nvfp4 supports the {supported} families, not {family}")
    if export_format == "peft" and cfg.job != "finetune":
        raise ExportError(f"--format peft needs a LoRA fine-tuning run; {checkpoint} is a {cfg.job} run "
                          "(no adapters: use --format hf)")
    if export_format == "peft" and not cfg.model.hf_checkpoint:
        raise ExportError(f"--format peft: {checkpoint} has no model.hf_checkpoint, the base the adapters need")
    return Source(checkpoint, cfg, quantizers)


def tokenizer_dir(cfg: JobConfig, tokenizer: str | None) -> Path | None:
    """Where the export's tokenizer comes from: --tokenizer, else model.hf_checkpoint (None: unknown)."""
    from train.serving import has_tokenizer

    if tokenizer is not None:
        if not has_tokenizer(tokenizer):
            raise ExportError(f"--tokenizer {tokenizer}: no tokenizer there (needs tokenizer_config.json and "
                              "tokenizer.json, vocab.json + merges.txt or tokenizer.model)")
        return Path(tokenizer).absolute()
    base = base_dir(cfg)
    return base if base is not None and has_tokenizer(base) else None


def base_dir(cfg: JobConfig) -> Path | None:
    """The run's starting HF checkpoint directory, when it has one that still exists."""
    hf_checkpoint = cfg.model.hf_checkpoint
    return Path(hf_checkpoint) if hf_checkpoint and Path(hf_checkpoint).is_dir() else None


def model_args(cfg: JobConfig):
    """The architecture: the run's starting HF checkpoint's config.json, else the registry name."""
    import json

    from train.models import get_model_args
    from train.models.errors import UnknownModelError
    from train.models.hf_adapters import args_from_hf_config

    hf_dir = cfg.model.hf_checkpoint
    if hf_dir and (Path(hf_dir) / "config.json").is_file():
        return args_from_hf_config(json.loads((Path(hf_dir) / "config.json").read_text()), name=str(cfg.model.name))
    try:
        return get_model_args(str(cfg.model.name))
    except UnknownModelError:
        raise ExportError(f"cannot rebuild model {cfg.model.name!r}: not a registry name, and the run's "
                          f"model.hf_checkpoint {hf_dir} has no config.json any more") from None


def load_student(source: Source, device: str, quantized: bool, merge: bool = True):
    """Our model with the checkpoint's weights (fp32 or the run's param dtype), on `device`.
    quantized: re-create the quantizers (amax loaded too); else the plain model (amax ignored).
    merge: a LoRA run's adapters folded into the base weights; else left in place (peft layers)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from train.models import build_model

    cfg = source.cfg
    dtype = torch.bfloat16 if cfg.model.param_dtype == "bfloat16" else torch.float32
    model = build_model(model_args(cfg), device=device, dtype=dtype, seed=None)
    if quantized:
        from train.quant.recipes import restore_quantizer_state

        model = restore_quantizer_state(model, source.quantizers["modelopt_state"])
    lora = cfg.job == "finetune"
    if lora:
        from train.lora import apply_lora  # the LoRA engineer's module (adapters as in training)

        model = apply_lora(model, cfg.lora)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(source.checkpoint))  # fills in place; optimizer and extra keys ignored
    model.load_state_dict(state["model"])
    if lora and merge:
        from train.lora import merge_lora

        model = merge_lora(model)
    return model.eval()


def export_hf(source: Source, out: Path, device: str) -> None:
    import torch

    from train.models import save_hf

    model = load_student(source, device, quantized=False)
    save_hf(model.to(torch.bfloat16), out)


def hf_name(name: str) -> str:
    """Our module/buffer name -> transformers' (llama, qwen3): everything but lm_head is under model."""
    return name if name.startswith("lm_head") else f"model.{name}"


def export_peft(source: Source, out: Path, device: str) -> None:
    from train.lora import save_peft_adapters

    model = load_student(source, device, quantized=False, merge=False)
    save_peft_adapters(model, source.cfg.lora, str(Path(source.cfg.model.hf_checkpoint).absolute()), out)


def hf_amax(student) -> dict:
    """A quantized student's amax buffers under transformers' names ({hf name: tensor})."""
    return {hf_name(key): value for key, value in student.state_dict().items() if key.endswith("._amax")}


def quantize_hf_model(hf_model, recipe: str, amax: dict, device: str):
    """transformers' model fake-quantized with `recipe` and our amax values (returned in place).

    Same recipe on transformers' modules (creates the same quantizers, modelopt's exclusions);
    one dummy batch gives every input quantizer an amax buffer, overwritten with ours."""
    import torch

    from train.quant.recipes import quantize_model

    quantize_model(hf_model, recipe, [torch.zeros(1, 16, dtype=torch.long, device=device)])
    ours, theirs = set(amax), {key for key in hf_model.state_dict() if key.endswith("._amax")}
    if ours != theirs:
        raise ExportError(f"quantizers differ between our model and transformers': only ours "
                          f"{sorted(ours - theirs)[:5]}, only theirs {sorted(theirs - ours)[:5]}")
    hf_model.load_state_dict({key: value.to(device) for key, value in amax.items()}, strict=False)
    return hf_model


def quantized_student_hf(source: Source, device: str, scratch_parent: Path) -> tuple:
    """(transformers' model of the run's student in fp32, fake-quantized with the run's recipe
    and amax; those amax under HF names). Built from the full-precision trained weights (saved
    through a scratch directory under scratch_parent): the FP4 rounding must see them."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.models import build_model, save_hf

    student = load_student(source, device, quantized=True)
    amax = hf_amax(student)
    plain = {key: value for key, value in student.state_dict().items() if "_quantizer." not in key}
    args = student.args
    del student
    with tempfile.TemporaryDirectory(dir=scratch_parent, prefix=".export-fp32-") as scratch:
        carrier = build_model(args, device="meta", dtype=next(iter(plain.values())).dtype)
        carrier.load_state_dict(plain, assign=True)
        carrier.tie_weights()
        save_hf(carrier, scratch)
        del carrier, plain
        hf_model = AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).to(device).eval()
    return quantize_hf_model(hf_model, source.quantizers["recipe"], amax, device), amax


def export_hf_nvfp4(source: Source, out: Path, device: str) -> None:
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    hf_model, _ = quantized_student_hf(source, device, out.parent)
    # bf16 for what stays unquantized (embeddings, norms, lm_head): export_hf_checkpoint keeps
    # each tensor's dtype. The quantized linears keep fp32 weights and `dtype` is fp32 because the
    # export packs weight.to(dtype): the FP4 values then come from the trained weights exactly as
    # the training-time fake quantization computed them (bf16 would round first and move ~0.3%
    # of them by one FP4 step). The export's own dummy forward (it traces which linears share
    # an input) runs under autocast, the model being part bf16, part fp32.
    for module in hf_model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if not (quantizer is not None and quantizer.is_enabled):
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(torch.bfloat16)
    hf_model.config.dtype = torch.bfloat16
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        export_hf_checkpoint(hf_model, dtype=torch.float32, export_dir=out)


WRITERS = {"hf": export_hf, "hf-nvfp4": export_hf_nvfp4, "peft": export_peft}


def export(run_dir: str | Path, export_format: str, out: str | Path, iteration: int | None = None,
           device: str = "cpu", tokenizer: str | Path | None = None) -> Path:
    """Writes the export to `out` (atomically); raises ExportError on bad input."""
    if export_format not in FORMATS:
        raise ExportError(f"--format {export_format!r}: unknown; known: {', '.join(FORMATS)}")
    out = Path(out).absolute()
    if out.exists():
        raise ExportError(f"--out {out} exists; remove it or choose another directory")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ExportError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    source = read_source(Path(run_dir), iteration, export_format)
    tokenizer = tokenizer_dir(source.cfg, None if tokenizer is None else str(tokenizer))
    temporary = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)  # leftover of a killed export
    temporary.mkdir(parents=True)
    try:
        WRITERS[export_format](source, temporary, device)
        add_serving_files(temporary, tokenizer, base_dir(source.cfg), model_files=export_format != "peft")
        temporary.rename(out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    log.info("exported %s (%s, job %s) as %s to %s", source.checkpoint, source.cfg.model.name, source.cfg.job,
             export_format, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (holds checkpoints/<model>/)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--iteration", type=int, help="checkpoint iteration (default: the latest)")
    parser.add_argument("--tokenizer", help="tokenizer directory to copy (default: the run's model.hf_checkpoint)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    try:
        export(args.run_dir, args.export_format, args.out, args.iteration, args.device, args.tokenizer)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
