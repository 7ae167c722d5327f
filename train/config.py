"""The typed config tree, registered in Hydra's ConfigStore.

configs/<job>.yaml picks groups (data/, optim/, ...) on top of these schemas;
`???` marks what must be given. Values from a .conf file arrive through the
environment and are applied in one place: train/launch/conf.py (CONF_VARIABLES).
Precedence, lowest first: schema default < configs/ YAML < .conf < key=value on the CLI.

Each entrypoint turns the composed DictConfig into a JobConfig once (to_job_config) and
hands the typed sections on: a key's default lives here and nowhere else.
"""

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING  # registry name (train/models/registry.py) or a display name
    hf_checkpoint: Optional[str] = None  # HF directory with the starting weights
    attention_backend: str = "sdpa"  # sdpa | flash | reference
    param_dtype: str = "float32"  # float32 | bfloat16
    init_seed: int = 1234


@dataclass
class DataConfig:
    # synthetic: seeded random tokens (no files; the embedded default);
    # blend: Megatron .bin/.idx files through a datablend JSON.
    source: str = "blend"
    dataset_name: str = "openscience"
    blend_path: Optional[str] = None  # default: <datacache_dir>/datablend_<dataset_name>.json
    datacache_dir: str = "data"
    seq_length: int = 256
    train_samples: Optional[int] = None  # default: one epoch of the blend's train split
    iterations_to_skip: str = ""  # Megatron's --iterations-to-skip: "100 200-205"
    seed: int = 1234


@dataclass
class PreprocessConfig:
    input: str = MISSING  # HF dataset name, or a local .jsonl/.json/.parquet/.arrow path
    output_prefix: str = MISSING  # writes <prefix>_text_document.bin/.idx
    tokenizer: str = MISSING  # local HF tokenizer directory
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    max_docs: Optional[int] = None
    workers: int = 2  # tokenizing processes; each one's tokenizer uses cores // workers threads
    batch_size: int = 1000  # documents per tokenizer call
    append_eod: bool = True
    validation_fraction: float = 0.0
    chat: bool = False  # render `messages` / Alpaca records with the chat template
    keep_cot: bool = True  # keep <think>...</think> reasoning blocks
    seed: int = 1234  # picks the validation documents
    format: str = "auto"  # auto | text | messages | alpaca (auto: by each record's keys)
    loss_mask: Optional[bool] = None  # write <prefix>_loss_mask; None: yes for chat/SFT input
    reasoning_start: str = "<think>"
    reasoning_end: str = "</think>"
    streaming: bool = False  # HF hub input: stream instead of loading the cached dataset
    word_cache: bool = True  # plain text: cache each word's ids where exact (train/data/word_cache.py)
    malloc: str = "auto"  # auto | system | mimalloc | tcmalloc | jemalloc | /path/lib.so (train/data/malloc.py)
    datablend: Optional[str] = None  # also write this datablend JSON: the train (and valid) outputs at weight 1


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_iters: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)


@dataclass
class TrainingConfig:
    micro_batch_size: int = 2  # MBS: sequences per rank per forward
    global_batch_size: Optional[int] = None  # GBS; default MBS x data-parallel size
    train_iters: Optional[int] = None  # default: train_samples // GBS
    seed: int = 1234
    precision: str = "fp32"  # fp32 (CPU) | bf16 (autocast, fp32 master weights): every GPU conf sets bf16
    log_interval: int = 1
    log_params_norm: bool = False
    eval_interval: int = 0  # 0: no evaluation; else val_loss/val_ppl every N iterations
    eval_iters: int = 2  # micro-batches of the valid split per data-parallel rank
    eval_only: bool = False  # load the latest checkpoint (or initial weights), evaluate, exit
    # non-finite loss/grad norm: the step is skipped; this many in a row stop the job (0: never)
    max_bad_iterations: int = 5
    debug_nan_at_iteration: Optional[str] = None  # tests: "3" or "3-7": report a NaN loss there
    # seconds of wall time after which the job saves and stops cleanly (0: no budget)
    time_budget_s: float = 0.0
    # early stopping (needs eval_interval): stop with reason "early_stop" once val_loss has not
    # improved on the best by more than early_stop_min_delta for this many evaluations (0: off)
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1  # TP_SIZE
    pipeline_parallel_size: int = 1  # PP_SIZE
    pipeline_layers: str = ""  # PP_LAYERS: blocks per stage, "3,5" (empty: balanced, train/parallel/checks.py)
    # PP_SCHEDULE: 1f1b | interleaved_1f1b (virtual_stages model chunks per rank, train/parallel/pipeline.py)
    pipeline_schedule: str = "1f1b"
    virtual_stages: int = 1  # PP_VIRTUAL_STAGES: stages per rank (interleaved_1f1b: at least 2; 1f1b: 1)
    expert_parallel_size: int = 1  # EP_SIZE
    # DP_SHARDING: ddp | fsdp (FSDP2, ZeRO-3) | fsdp_zero2 | zero1 (DDP + sharded optimizer state);
    # train/parallel/data_parallel.py gives the memory of each
    data_parallel: str = "ddp"
    # FSDP2's MixedPrecisionPolicy (DP_SHARDING=fsdp|fsdp_zero2): bf16 all-gather and compute, fp32
    # gradient reduce-scatter and master weights; FSDP_MIXED_PRECISION. auto: on for bf16 runs on
    # CUDA (train/parallel/checks.py fsdp_mixed_precision_on); true | false. Off: bf16 autocast over
    # fp32 parameters (training.precision=bf16), which all-gathers fp32.
    fsdp_mixed_precision: str = "auto"
    activation_checkpointing: bool = False  # ACTIVATION_CHECKPOINTING: recompute each block in backward
    compile: bool = False  # COMPILE: torch.compile each block
    backend: str = "auto"  # auto: nccl with CUDA, gloo without
    # DIST_TIMEOUT_S: a step hung this long ends the job naming the stopped rank (train/launch/watchdog.py);
    # the process group's timeout is this plus max(30 s, 10 %)
    timeout_s: int = 1800


@dataclass
class CheckpointConfig:
    root: str = "runs"  # QAD_CHECKPOINT_ROOT: run directories live below
    save_interval: int = 100  # iterations (0: no periodic saves; the last iteration is saved)
    save_interval_s: float = 0.0  # also save when this much wall time passed since the last save (0: off)
    keep_last: int = 3
    keep_every: int = 0  # iterations divisible by this are never purged (0: off)
    async_save: bool = False  # dcp.async_save with CUDA; synchronous on CPU
    save_on_signal: bool = True  # SIGUSR2/SIGTERM: finish the iteration, save, stop
    requeue: bool = True  # ask the sbatch wrapper to `scontrol requeue` after a signal save
    max_failed_saves: int = 3  # failed saves (disk full, I/O error) in a row before the job stops (exit 4)


@dataclass
class DistillConfig:
    teacher_model: Optional[str] = None  # display name of the teacher (run dir name)
    teacher_checkpoint: Optional[str] = None  # HF directory
    teacher_model_config: Optional[str] = None  # YAML of teacher overrides
    kd_config_path: Optional[str] = None  # KD_CFG_PATH: YAML merged into these keys (train/distill/kd_config.py)
    temperature: float = 1.0
    lm_loss_weight: float = 0.0
    kd_loss_weight: float = 1.0  # weight of the KL term; 0 (with lm_loss_weight 1): QAT, the LM loss only
    chunk_size: int = 512  # token positions per chunk of the KD loss: bounds its (chunk, vocab) fp32 logits
    tokenizer_vocab_size: Optional[int] = None  # real tokens; lets vocabularies differ by padding only


@dataclass
class QuantConfig:
    recipe: str = "nvfp4"  # nvfp4 | nvfp4_mlp_only | fp8 | none
    calibration_batches: int = 4


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    # a quant recipe (nvfp4 | nvfp4_mlp_only | fp8): fake-quantize the frozen base before the
    # adapters go in (quant.calibration_batches micro-batches calibrate it); the adapters stay
    # unquantized. None: full-precision base.
    quantized_base: Optional[str] = None


@dataclass
class ValidateConfig:
    """Fine-tuning's validate mode (mode=validate): train/finetune_validate.py documents the set format."""
    val_set: Optional[str] = None  # VAL_SET: JSONL of {"prompt", "label", "category"}
    tokenizer: Optional[str] = None  # HF tokenizer directory; default: model.hf_checkpoint
    max_new_tokens: int = 32
    batch_size: int = 8  # prompts decoded together (per rank)
    max_samples: Optional[int] = None  # the first N records of the set (None: all)
    enable_thinking: bool = False  # passed to the chat template (Qwen3: no <think> block)


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # scalars in tensorboard/<model>/
    jsonl: bool = True  # logs/<model>_<job>_<datetime>.jsonl (train/metrics.py lists the keys)
    wandb_project: str = ""  # WANDB_PROJECT: W&B logging next to TensorBoard, rank 0 (train/wandb_sink.py); "": off
    wandb_entity: str = ""  # WANDB_ENTITY: W&B user or team ("": the account's default)
    wandb_mode: str = ""  # WANDB_MODE: online | offline | disabled ("": wandb's own default, online)


@dataclass
class JobConfig:
    job: str = MISSING  # qad | pretrain | finetune
    mode: str = "train"  # finetune: train | validate (val loss and labeled-set accuracy)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def to_job_config(cfg: "JobConfig | DictConfig | dict") -> JobConfig:
    """The typed tree of a composed (or hand-built) config: checked against the schema, schema
    defaults for what it leaves out. A JobConfig comes back as it is.

    Raises omegaconf's errors naming the key: an unknown key, a wrong type, a `???` left."""
    if isinstance(cfg, JobConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), cfg))


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="job_schema", node=JobConfig)
    store.store(name="preprocess_schema", node=PreprocessConfig)


register_configs()
