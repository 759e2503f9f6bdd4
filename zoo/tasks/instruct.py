"""Multimodal instruction tuning (MoE-LLaVA's MoE-Tuning stages; Uni-MoE's progressive stages) as a LightningModule.

    batch {"input_ids" [B, L] with media placeholders, "attention_mask", "labels" (-100 = not learned), "images",
           ...} -> model (MoE-LLaVA-style: splices media tokens) -> loss = answer-token cross entropy + MoE aux loss

A stage is a recipe: which model (``model`` preset + ``model_overrides``), which parameter groups train
(``trainable``: group names of :mod:`zoo.models.freeze`, never substrings; printed and logged as a table before step
1), where its weights start (``init_from``: the previous stage's ``train.py`` checkpoint) and whether the dense decoder
is upcycled into MoE layers first (``upcycle``: MoE-Tuning stage III, :func:`zoo.models.upcycle.upcycle_multimodal_decoder`).

Test metrics (generation: greedy, ``max_new_tokens``, deterministic routing), per task of the datamodule
(``task_names``; the kind of each from ``zoo.data.instruct_sets.TASK_METRICS``):

- ``test/<task>/exact_match``: answers equal to the reference (case-insensitive, a final period ignored);
- yes/no tasks (POPE-style): also ``test/<task>/accuracy`` and ``test/<task>/yes_ratio`` (share of "yes" answers);
- captions: ``test/<task>/bleu4`` and ``test/<task>/cider`` (:mod:`zoo.tasks.caption_metrics`, the COCO caption
  evaluation's definitions) against every reference caption of the photo.

Routing of the test pass (the paper's routing figure): per MoE layer, the share of each modality's tokens each
expert receives (:meth:`write_test_plots`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from zoo.factory import create_model
from zoo.models.freeze import apply_freeze, trainable_counts, trainable_table
from zoo.models.multimodal import IGNORE_INDEX, MODALITY_NAMES
from zoo.moe import MoELayer

# Batch keys that carry media (zoo.data.instruct's batch contract); passed to the model by name.
MEDIA_KEYS = ("images", "audio", "audio_lengths", "video")


@functools.lru_cache(maxsize=None)
def _forward_params(model_cls: type) -> frozenset:
    """The argument names of ``model_cls.forward`` (read once per class: ``_media`` runs every step)."""
    return frozenset(inspect.signature(model_cls.forward).parameters)
from zoo.tasks.base import ZooTask, moe_layer_names
from zoo.tasks.checkpoints import load_training_checkpoint
from zoo.tasks.optim import OptimizerConfig
from zoo.tasks.routing_report import ModalityRoutingSummary, RoutingReport

MODEL_PREFIX = "model."


def load_stage_weights(path: Union[str, Path]) -> dict[str, Tensor]:
    """The model tensors of a previous stage: a ``train.py`` checkpoint (``model.*`` entries of its state dict)."""
    checkpoint = load_training_checkpoint(path)
    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    if not state:
        raise ValueError(f"checkpoint {path} holds no model weights (no 'model.*' tensors in its state_dict)")
    return state


def normalise_answer(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


class InstructTask(ZooTask):
    """Train / evaluate a multimodal LM on instruction data, one stage at a time.

    Args:
        model: a preset of a multimodal family (e.g. ``"moe_llava_tiny"``); model_overrides: changes to its config
            (dotted keys, e.g. ``{"decoder.depth": 2}``).
        vocab_size: None = the datamodule's (its tokenizer).
        trainable: the parameter groups this stage trains (:mod:`zoo.models.freeze`; MoE-Tuning:
            ``zoo.models.freeze.MOE_TUNING_STAGES``); None = every parameter the model does not freeze itself.
        init_from: the previous stage's ``train.py`` checkpoint, a path or ``"run:NAME"`` (= ``runs/NAME/checkpoints/
            last.ckpt`` beside this run's folder ``runs/<run_name>``); its model weights are loaded at the
            start of a fresh run (not when resuming this stage: then this stage's own checkpoint holds them).
        upcycle: MoE-Tuning stage III: ``{"placement": "sparse", "num_experts": 4, "top_k": 2, ...}`` (the other keys
            are :class:`zoo.moe.MoEConfig` fields): the dense model (``model`` + ``init_from``) is upcycled, every
            expert a copy of the FFN it replaces, routers fresh.
        expert_files: Uni-MoE stage 3: ``{expert index: file}``; after ``init_from`` / ``upcycle``, expert ``e`` of every
            MoE layer starts as the FFN in that file (:mod:`zoo.models.expert_files`). A file is a path or
            ``"run:NAME/FILE"`` (= ``runs/NAME/experts/FILE.safetensors``, what ``export_ffn: FILE`` wrote there).
        lora: LoRA for this stage, applied after ``upcycle`` and before ``trainable`` (:class:`zoo.models.lora_spec.
            LoRASpec`): ``{"experts": true, "modules": ["attention"], "r": 8, "alpha": 16}``; ``experts``: every MoE
            layer's experts get per-expert frozen bases (their own weights) and per-expert low-rank deltas;
            ``modules``: freeze group names or full module names of ``nn.Linear`` layers to wrap. Train the factors
            with ``trainable: [..., lora]``. Order at the start of a fresh run: ``init_from`` (loaded through the
            same upcycle + LoRA wrapping, the factors kept fresh) then ``expert_files`` (into the frozen bases), so
            the bases are the file weights and every expert starts equal to its file's FFN (``B = 0``). The wrapping
            is part of the model's structure (built in ``__init__``), so a checkpoint of this stage holds and
            restores the factors.
        export_ffn: Uni-MoE stage 2: at the end of training, write this run's dense FFNs as the named expert file
            ``<run folder>/experts/<export_ffn>.safetensors``.
        max_new_tokens: answer length limit of test-time generation.
        gradient_checkpointing: recompute decoder block activations in the backward pass; ``"except_moe"``: all
            but the MoE layers (``DecoderLM.gradient_checkpointing``).
        compile: run the decoder blocks (``DecoderLM.compile_blocks``) and, where the model has one, the vision
            tower (``compile_tower``) through ``torch.compile`` while training; ``"cuda_graphs"``: the decoder also
            replayed as CUDA graphs (fixed-length batches).
        **shared: optimiser, LR schedule and eval-time routing (:class:`ZooTask`).
    """

    optimizer_defaults = OptimizerConfig(betas=(0.9, 0.95), weight_decay=0.0, min_lr_ratio=0.1)

    def __init__(
        self,
        model: str = "moe_llava_tiny",
        model_overrides: Optional[dict[str, Any]] = None,
        vocab_size: Optional[int] = None,
        trainable: Optional[list[str]] = None,
        init_from: Optional[str] = None,
        upcycle: Optional[dict[str, Any]] = None,
        expert_files: Optional[dict[int, str]] = None,
        lora: Optional[dict[str, Any]] = None,
        export_ffn: Optional[str] = None,
        max_new_tokens: int = 24,
        gradient_checkpointing: Union[bool, Literal["except_moe"]] = False,
        compile: Union[bool, Literal["cuda_graphs"]] = False,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        from zoo.models.lora_spec import LoRASpec

        self.lora_spec = LoRASpec.from_dict(lora)  # validated before the (slow) model build
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = self._build_model()
        self.test_routing: Optional[ModalityRoutingSummary] = None
        self.test_answers: list[dict[str, Any]] = []
        self.last_test_metrics: dict[str, float] = {}
        self._routing_report: Optional[RoutingReport] = None

    # ------------------------------------------------------------------------------------------ model
    def _dense_model(self) -> nn.Module:
        hp = self.hparams
        overrides = dict(hp.model_overrides or {})
        if hp.get("vocab_size") is not None:
            overrides["decoder.vocab_size"] = int(hp.vocab_size)
        return create_model(hp.model, **overrides)

    def _upcycled(self, model: nn.Module) -> nn.Module:
        from zoo.models.upcycle import upcycle_multimodal_decoder
        from zoo.moe import MoEConfig

        spec = dict(self.hparams.upcycle)
        placement = spec.pop("placement", "sparse")
        dec = model.config.decoder
        spec.setdefault("activation", dec.activation)
        spec.setdefault("expert_bias", dec.mlp_bias)
        try:
            moe = MoEConfig(**spec)
        except TypeError as err:
            raise ValueError(f"upcycle: {err}; its keys are 'placement' and zoo.moe.MoEConfig fields") from err
        return upcycle_multimodal_decoder(model, moe, placement)

    def _stage_structure(self, model: nn.Module) -> nn.Module:
        """The dense model turned into this stage's structure: upcycled (``upcycle``), then LoRA-wrapped (``lora``).
        Used for this stage's model and for the previous stage's weights (:meth:`_load_previous_stage`)."""
        if self.hparams.get("upcycle"):
            model = self._upcycled(model)
        if self.lora_spec is not None:
            self.lora_spec.apply(model)
        return model

    def _build_model(self) -> nn.Module:
        hp = self.hparams
        model = self._stage_structure(self._dense_model())
        if hp.get("trainable") is not None:
            apply_freeze(model, list(hp.trainable))
        if hasattr(model, "decoder"):
            model.decoder.gradient_checkpointing = hp.gradient_checkpointing
            model.decoder.compile_blocks = hp.get("compile", False)
        if hasattr(model, "compile_tower"):
            model.compile_tower = bool(hp.get("compile", False))
        self.apply_eval_routing(model)
        self.layer_names = moe_layer_names(model)
        return model

    def take_from_datamodule(self, dm: Any) -> None:
        """The vocabulary size comes from the datamodule's tokenizer unless given (a disagreeing value is an
        error)."""
        want = getattr(dm, "vocab_size", None)
        if want is None:
            return
        given = self.hparams.get("vocab_size")
        if given is not None and int(given) != int(want):
            raise ValueError(f"model vocab_size={given} but the datamodule's tokenizer has {want} tokens; drop the "
                             "explicit vocab_size (it is taken from the data) or use the tokenizer it was made for")
        if given is None or self.model.config.decoder.vocab_size != int(want):
            self.hparams["vocab_size"] = int(want)
            self.model = self._build_model()

    def on_fit_start(self) -> None:
        hp = self.hparams
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if hp.get("init_from") and not resuming:
            self._load_previous_stage(self._resolve_init_from(str(hp.init_from)))
        if hp.get("expert_files") and not resuming:
            from zoo.models.expert_files import init_experts_from_files

            files = {int(e): self._resolve_expert_file(str(f)) for e, f in hp.expert_files.items()}
            for e, path in sorted(init_experts_from_files(self.model, files).items()):
                print(f"[{type(self).__name__}] expert {e} of every MoE layer starts from {path}", flush=True)
        table = trainable_table(self.model)
        print(f"[{type(self).__name__}] trainable / frozen parameters per group:\n{table}", flush=True)
        if self.logger is not None:
            counts = trainable_counts(self.model)
            self.logger.log_metrics({f"params/{g}/trainable": float(t) for g, (t, f) in counts.items()}, step=0)

    def _resolve_init_from(self, value: str) -> str:
        """``"run:NAME"`` -> ``NAME``'s ``checkpoints/last.ckpt`` beside this run (``train.py`` runs this one in
        ``<root>/runs/<run_name>``, so NAME's is ``<root>/runs/NAME``); a path is returned as is."""
        if not value.startswith("run:"):
            return value
        path = self._run_folder().parent / value[len("run:"):] / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"init_from={value!r}: no checkpoint at {path}; train that stage first (its recipe "
                                    "names the run) or give the checkpoint's path")
        return str(path)

    def _run_folder(self) -> Path:
        """This run's folder (``train.py``: ``<root>/runs/<run_name>``)."""
        return Path(self.trainer.default_root_dir if self._trainer is not None else Path.cwd() / "runs" / "_")

    def _resolve_expert_file(self, value: str) -> str:
        """``"run:NAME/FILE"`` -> ``runs/NAME/experts/FILE.safetensors`` beside this run; a path is returned as is."""
        if not value.startswith("run:"):
            return value
        run, _, name = value[len("run:"):].partition("/")
        if not run or not name:
            raise ValueError(f"expert file {value!r}: write run:RUN_NAME/FILE_NAME (the stage-2 run and its export_ffn)")
        return str(self._run_folder().parent / run / "experts" / f"{name}.safetensors")

    def on_fit_end(self) -> None:
        if self.hparams.get("export_ffn") and self.trainer.is_global_zero:
            from zoo.models.expert_files import save_expert_file

            path = save_expert_file(self.model, self._run_folder() / "experts" / f"{self.hparams.export_ffn}.safetensors")
            print(f"[{type(self).__name__}] dense FFNs written to {path}", flush=True)

    def _load_previous_stage(self, path: str) -> None:
        """Weights of the previous stage into this stage's model: loaded into the dense model the previous stage
        trained, given this stage's structure (upcycled, LoRA-wrapped), then copied in place (the optimiser already
        holds the tensors). Routers and LoRA factors stay this model's fresh ones."""
        state = load_stage_weights(path)
        src = self._dense_model()
        missing, unexpected = src.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"init_from={path} does not fit the model {self.hparams.model!r} of this stage before "
                             f"upcycling: missing {missing[:4]}, unexpected {unexpected[:4]}; the previous stage "
                             "must train the same preset and overrides (and the same vocabulary)")
        from zoo.models.lora_spec import lora_parameter_names

        src = self._stage_structure(src)
        target = self.model.state_dict()
        new = src.state_dict()
        # routers (upcycled) and LoRA factors stay this model's fresh ones (seeded by the run); experts are copies
        fresh = lora_parameter_names(self.model)
        if self.hparams.get("upcycle"):
            fresh |= {f"{name}.router.{p}" for name, layer in self.model.named_modules() if isinstance(layer, MoELayer)
                      for p, _ in layer.router.named_parameters()}
        new = {k: (target[k] if k in fresh else v) for k, v in new.items()}
        self.model.load_state_dict(new, strict=True)

    # ------------------------------------------------------------------------------------------ steps
    def _media(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's media (``MEDIA_KEYS``) as keyword arguments of the model's forward / generate: each family's
        model names the media it takes in its signature (MoE-LLaVA: ``images``; Uni-MoE also ``audio`` / ``video``),
        so no family is named here. A medium the model cannot take is an error, not silently dropped."""
        accepted = _forward_params(type(self.model))
        given = {k: batch[k] for k in MEDIA_KEYS if batch.get(k) is not None}
        refused = sorted(set(given) - accepted)
        if refused:
            raise ValueError(f"the batch holds {refused} but {type(self.model).__name__} takes no such input; use a "
                             "model of a family with those encoders or drop the tasks that need them")
        return given

    def forward(self, batch: dict[str, Tensor]) -> Any:
        return self.model(batch["input_ids"], batch.get("attention_mask"), labels=batch.get("labels"),
                          **self._media(batch))

    def _shared_step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        out = self(batch)
        aux = out.aux_loss.float()
        loss = out.loss.float()
        n = batch["input_ids"].shape[0]
        self.log_losses_and_routing(split, loss, loss - aux, aux, out, batch_size=n)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    # ------------------------------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        self._routing_report = RoutingReport(self.model).start()
        self.test_routing = None
        self.test_answers = []

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")
        dm = self.attached_datamodule()
        if dm is None or getattr(dm, "test_set", None) is None:
            return
        if self._routing_report is not None:  # routing of the teacher-forced pass only, not of generation
            self._routing_report.count_examples(batch["input_ids"].shape[0])
            self._routing_report.stop()
        try:
            self._answer(batch, dm)
        finally:
            if self._routing_report is not None:
                self._routing_report.start()

    def _answer(self, batch: dict[str, Tensor], dm: Any) -> None:
        prompts, refs = zip(*(dm.test_set.prompt(int(i)) for i in batch["index"].tolist()))
        pad = int(dm.pad_token_id)
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), P, dtype=torch.bool)
        for b, p in enumerate(prompts):  # left padding: every row ends with its last prompt token
            ids[b, P - len(p):], mask[b, P - len(p):] = p, True
        new = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), **self._media(batch),
                                  max_new_tokens=int(self.hparams.max_new_tokens), eos_token_id=int(dm.eos_token_id))
        tasks = dm.task_names
        for b, row in enumerate(new.tolist()):
            self.test_answers.append({"index": int(batch["index"][b]), "task": tasks[int(batch["task_index"][b])],
                                      "answer": dm.tokenizer.decode(row), "references": list(refs[b])})

    def on_test_epoch_end(self) -> None:
        report, self._routing_report = self._routing_report, None
        if report is not None:
            report.stop()
            if report.layer_names:  # a dense stage has no routing to report
                summary = report.modality_summary(report.num_examples)
                summary = dataclasses.replace(summary, modality_names=MODALITY_NAMES[:summary.counts.shape[1]])
                present = [m for m in range(summary.tokens.shape[1]) if float(summary.tokens[:, m].sum()) > 0]
                self.test_routing = _only_modalities(summary, present)
        metrics = score_answers(self.test_answers, self._task_metrics())
        self.last_test_metrics = metrics
        for name, value in metrics.items():
            self.log(f"test/{name}", value, on_step=False, on_epoch=True)

    def _task_metrics(self) -> dict[str, str]:
        from zoo.data.instruct_sets import TASK_METRICS

        return dict(TASK_METRICS)

    def write_test_plots(self, out_dir: Union[str, Path], title: str = "",
                         class_names: Optional[list[str]] = None) -> list[str]:
        """The routing figure of the last test pass (per MoE layer, each modality's share of tokens per expert) and
        the answers as JSON lines (``test_answers.jsonl``)."""
        from zoo.tasks.routing_report import write_modality_routing_plots

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths: list[str] = []
        if self.test_answers:
            answers = out_dir / "test_answers.jsonl"
            answers.write_text("".join(json.dumps(a) + "\n" for a in self.test_answers))
            paths.append(str(answers))
        routing = self.test_routing
        if routing is not None and routing.layer_names:
            paths += [str(p) for p in write_modality_routing_plots(routing, out_dir, "routing_test", title=title)]
        return paths


def _only_modalities(summary: ModalityRoutingSummary, keep: Sequence[int]) -> ModalityRoutingSummary:
    idx = torch.tensor(list(keep), dtype=torch.long)
    return dataclasses.replace(summary, counts=summary.counts[:, idx], mean_probs=summary.mean_probs[:, idx],
                               token_entropy=summary.token_entropy[:, idx], tokens=summary.tokens[:, idx],
                               modality_names=tuple(summary.modality_names[i] for i in keep))


def score_answers(answers: Sequence[dict[str, Any]], task_metrics: dict[str, str]) -> dict[str, float]:
    """Per task: ``<task>/exact_match``; ``yes_no`` tasks also ``accuracy`` and ``yes_ratio``; ``caption`` tasks
    ``bleu4`` and ``cider`` over all references. Fractions in [0, 1] (CIDEr as computed)."""
    from zoo.tasks.caption_metrics import bleu4, cider_d

    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in answers:
        by_task[a["task"]].append(a)
    out: dict[str, float] = {}
    for task, rows in sorted(by_task.items()):
        kind = task_metrics.get(task, "exact")
        hits = [normalise_answer(r["answer"]) in {normalise_answer(x) for x in r["references"]} for r in rows]
        out[f"{task}/exact_match"] = sum(hits) / len(hits)
        if kind == "yes_no":
            said_yes = [normalise_answer(r["answer"]) == "yes" for r in rows]
            out[f"{task}/accuracy"] = out[f"{task}/exact_match"]
            out[f"{task}/yes_ratio"] = sum(said_yes) / len(said_yes)
        elif kind == "caption":
            out[f"{task}/bleu4"] = bleu4([r["answer"] for r in rows], [r["references"] for r in rows])
            out[f"{task}/cider"] = cider_d([r["answer"] for r in rows], [r["references"] for r in rows])
    return out


__all__ = ["InstructTask", "load_stage_weights", "score_answers", "IGNORE_INDEX"]
