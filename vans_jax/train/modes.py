"""What ``vans-jax train`` can run, in words (no JAX import: ``vans-jax train --help`` prints it)."""

MODE_DOCS = {
    "sft_vlm": "SFT of the VLM (LoRA by default, train.sft_vlm.trainable=full)",
    "sft_vdm": "SFT of the DiT (full by default), reference-frame conditioning, text dropout, latent cache",
    "grpo_stage1": "Joint-GRPO stage 1 (VLM LoRA; r_format + r_t1 + r_v1 through the frozen VDM)",
    "grpo_stage2": "Joint-GRPO stage 2 (DiT; anchors from the frozen stage-1 VLM; r_v2 + r_c2)",
    "grpo_vlm": "ablation: standard GRPO on the VLM alone (text rewards)",
    "grpo_vdm": "ablation: standard GRPO on the VDM alone (ground-truth captions as anchors)",
    "grpo_all_in_one": "ablation: one stage, both models, one joint reward",
}

MAIN_KEYS = (
    ("train.mode", "one of the modes above"),
    ("train.workdir", "checkpoints/, tb/, metrics.jsonl, final_metrics.json, export/; the same command resumes"),
    ("train.steps", "0: the mode's own (train.<mode>.steps, train.grpo.stage1_steps / stage2_steps)"),
    ("train.batch_size", "global examples (SFT) or prompts (GRPO) per step"),
    ("vlm.path / vdm.path / clip.path", "local model directories (Hugging Face / diffusers layouts)"),
    ("data.train_csv / data.rl_csv / data.video_root", "VANS-Data CSVs and the root of their video paths"),
    ("train.<mode>.lr, .trainable, .schedule, .warmup_steps, .ema_decay", "optimizer settings of SFT modes"),
    ("train.sft_vdm.latent_cache", "auto (<workdir>/latent_cache) | DIR | off"),
    ("train.sft_vdm.fg_weight, .fg_threshold", "> 0: foreground latent cells weigh 1 + fg_weight in the loss"),
    ("train.grpo.group_size, .beta, .clip_eps, .num_updates, .disabled_rewards", "Joint-GRPO knobs"),
    ("train.grpo.rewards, .shuffle_advantages", "reward list (built-ins, user functions, =weight); the control"),
    ("train.grpo.stage2_rewards, .stage2_batch_size", "grpo_stage2's own reward list / prompts a step ('' / 0: "
                                                      "train.grpo.rewards / train.batch_size)"),
    ("train.grpo.diagnostics_every", "stage 2: half-batch gradient agreement vs control, reward variance split"),
    ("train.grpo.grad_accum, .same_noise, .timestep_weight",
     "stage 2: rollout batches per update; one initial noise per group; none | std_dt timestep weights"),
    ("mesh.data / mesh.fsdp / mesh.tensor", "device mesh (-1: the rest of the devices)"),
    ("train.log_every / train.checkpoint_every / train.keep_checkpoints", "logging and checkpoints"),
)


def help_text() -> str:
    """The modes and the main config keys, as ``vans-jax train --help`` prints them."""
    w = max(len(m) for m in MODE_DOCS)
    lines = ["modes (--config.train.mode=...):"] + [f"  {m:<{w}}  {d}" for m, d in MODE_DOCS.items()]
    lines += ["", "main keys (--config.KEY=VALUE; the config file lists them all, e.g. configs/vans.py):"]
    lines += [f"  {k}\n      {d}" for k, d in MAIN_KEYS]
    lines += ["", "example: vans-jax train --config configs/tiny_world.py --config.train.mode=sft_vdm "
                  "--config.train.workdir=runs/sft_vdm"]
    return "\n".join(lines)


__all__ = ["MODE_DOCS", "MAIN_KEYS", "help_text"]
