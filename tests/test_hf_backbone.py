"""Hugging Face vision-language backbones (model.encoder = "hf"), on tiny models made here, offline.

Each test builds a randomly initialised Idefics3 (SmolVLM's architecture) or PaliGemma with a few
layers, a byte-level BPE tokenizer trained in memory and an image processor, and writes them with
``save_pretrained`` to a temporary folder: exactly what a user's local copy of a hub model looks like.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfimprove.config import ImproveConfig, load_config  # noqa: E402
from selfimprove.data.collect import collect_demos  # noqa: E402
from selfimprove.errors import CheckpointError, ConfigError  # noqa: E402
from selfimprove.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from selfimprove.model.policy import EmbodiedModel, ModelSpec  # noqa: E402
from selfimprove.train.improve import improve  # noqa: E402
from selfimprove.train.sft import sft  # noqa: E402

IDEFICS3_SPECIALS = (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                     + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
              patch_size=8)


def tiny_tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["push the red moon to the blue cube", "move the green star next to the yellow pentagon",
              "slide the blue moon towards the red cube"]
    tok.train_from_iterator(corpus * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<bos>", eos_token="<eos>")


def save_tiny_idefics3(path):
    """SmolVLM's architecture: SigLIP-style vision tower, pixel-shuffle connector, Llama text model."""
    tokenizer = tiny_tokenizer(IDEFICS3_SPECIALS)
    images = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = transformers.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                               chat_template=CHAT_TEMPLATE)
    config = transformers.Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, **TEXT),
        vision_config=VISION, scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    transformers.Idefics3ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_paligemma(path):
    """PaliGemma's architecture: SigLIP vision tower, linear projector, Gemma text model; no chat template."""
    tokenizer = tiny_tokenizer(["<image>"])
    images = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    processor = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    config = transformers.PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=len(processor.tokenizer), num_key_value_heads=1, head_dim=8,
                         pad_token_id=tokenizer.pad_token_id, **TEXT),
        vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **VISION),
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"), projection_dim=32)
    torch.manual_seed(0)
    transformers.PaliGemmaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


BUILDERS = {"idefics3": save_tiny_idefics3, "paligemma": save_tiny_paligemma}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny_vlm(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def tabletop_spec(folder, **kw) -> ModelSpec:
    base = dict(domain="language-table", obs_shapes={"image": [32, 32, 3], "effector": [2]}, action_low=[-0.1, -0.1],
                action_high=[0.1, 0.1], action_bins=41, max_steps=60, hidden=32, layers=1, encoder="hf", frames=2,
                hf_model=str(folder))
    return ModelSpec(**{**base, **kw})


def observations(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randint(0, 255, (n, 2, 32, 32, 3), dtype=torch.uint8, generator=g),
            "effector": torch.randn(n, 2, generator=g) * 0.1,
            "instruction": ["push the red moon to the blue cube", "push the blue cube to the red moon",
                            "push the green star to the top left corner"][:n]}


def test_vlm_trunk_feeds_both_heads_and_every_vlm_weight_learns(tiny_vlm):
    model = EmbodiedModel(tabletop_spec(tiny_vlm))
    obs = observations()
    action_logits, stg_logits = model(obs)
    assert action_logits.shape == (3, 2, 41) and stg_logits.shape == (3, 61)
    assert action_logits.dtype == torch.float32 and torch.isfinite(action_logits).all()
    # the instruction reaches the fused features: same frames, swapped roles -> different outputs
    swapped = {**obs, "image": obs["image"][[0, 0]], "effector": obs["effector"][[0, 0]],
               "instruction": obs["instruction"][:2]}
    a, _ = model(swapped)
    assert not torch.allclose(a[0], a[1])
    (action_logits.logsumexp(-1).sum() + stg_logits.logsumexp(-1).sum()).backward()
    vlm = model.encoder.vlm
    assert type(vlm).__name__ in ("Idefics3Model", "PaliGemmaModel")
    assert all(p.grad is not None for p in vlm.parameters() if p.requires_grad)
    assert any(k.startswith("encoder.vlm.") for k in model.state_dict())
    assert model.spec.extra["hf_config"]["model_type"] in ("idefics3", "paligemma")


def test_checkpoint_round_trip_gives_identical_outputs_without_the_pretrained_weights(tiny_vlm, tmp_path):
    model = EmbodiedModel(tabletop_spec(tiny_vlm)).eval()
    with torch.no_grad():
        for p in model.parameters():  # make it differ from the pretrained weights, as after training
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(model, tmp_path / "ck", meta={"stage": "sft"})
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["config.json", "model.safetensors"]
    stored = json.loads((tmp_path / "ck/config.json").read_text())["spec"]
    assert stored["encoder"] == "hf" and stored["extra"]["hf_config"] == model.spec.extra["hf_config"]
    hidden = tiny_vlm / "model.safetensors"  # only the processor files are read when loading a checkpoint
    hidden.rename(tiny_vlm / "moved.bin")
    try:
        loaded, meta = load_checkpoint(tmp_path / "ck", expect_domain="language-table")
    finally:
        (tiny_vlm / "moved.bin").rename(hidden)
    loaded.eval()
    obs = observations()
    with torch.no_grad():
        for a, b in zip(model(obs), loaded(obs)):
            assert torch.equal(a, b)
    assert meta == {"stage": "sft"} and loaded.spec == model.spec


def test_frozen_parts_get_no_gradients(tiny_vlm):
    heads = EmbodiedModel(tabletop_spec(tiny_vlm, hf_train="heads"))
    heads.train()
    assert not heads.encoder.vlm.training
    logits, _ = heads(observations())
    logits.sum().backward()
    assert all(p.grad is None for p in heads.encoder.vlm.parameters())
    assert heads.action_head.weight.grad is not None and heads.encoder.mlp[0].weight.grad is not None
    language = EmbodiedModel(tabletop_spec(tiny_vlm, hf_train="language"))
    frozen = {n for n, p in language.encoder.vlm.named_parameters() if not p.requires_grad}
    assert frozen and all("vision" in n for n in frozen)


def test_bfloat16_backbone_trains_and_round_trips(tiny_vlm, tmp_path):
    """What runs on a GPU (bf16 VLM, float32 heads), here on the CPU."""
    model = EmbodiedModel(tabletop_spec(tiny_vlm, hf_dtype="bfloat16"))
    assert {p.dtype for p in model.encoder.vlm.parameters()} == {torch.bfloat16}
    assert model.action_head.weight.dtype == torch.float32
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits, stg = model(observations())
    loss = logits.logsumexp(-1).mean() + stg.logsumexp(-1).mean()
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert changed({k: v for k, v in before.items() if ".vlm." in k}, model.state_dict())
    save_checkpoint(model.eval(), tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert {p.dtype for p in loaded.encoder.vlm.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        for a, b in zip(model(observations()), loaded.eval()(observations())):
            assert torch.equal(a, b)


@pytest.mark.parametrize("size", [32, 24, 48])
def test_cached_text_and_torch_pixels_match_the_processor(tiny_vlm, size):
    """The fast input path (cached token ids, pixels resized in torch) against the processor itself."""
    from selfimprove.envs.tabletop.world import TabletopEnv
    from selfimprove.model.hf_backbone import VLMInputs

    processor = transformers.AutoProcessor.from_pretrained(tiny_vlm)
    accepted = {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_attention_mask"}
    inputs = VLMInputs(processor, 2, (size, size), accepted)
    assert inputs.fast and inputs.target == (32, 32)
    env = TabletopEnv(image_size=size)
    frames = []
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        frames.append(np.stack([obs["rgb"][-1], env.step(np.array([0.05, 0.0]))[0]["rgb"][-1]]))
    images = torch.as_tensor(np.stack(frames))
    instructions = ["push the red moon to the blue cube", "slide the blue moon towards the red cube", "x"]
    cpu = torch.device("cpu")
    fast = inputs(images, instructions, cpu, torch.float32, fast=True)
    reference = inputs(images, instructions, cpu, torch.float32, fast=False)
    assert set(fast) == set(reference)
    for key in set(fast) - {"pixel_values"}:
        assert torch.equal(fast[key], reference[key]), key
    diff = (fast["pixel_values"] - reference["pixel_values"]).abs()
    if size == 32:  # no resizing: identical up to float rounding
        assert float(diff.max()) < 1e-5
    else:  # torch bicubic vs PIL's filter: about one grey level on rendered frames
        assert float(diff.mean()) < 0.02


def test_large_batches_run_in_chunks_with_the_same_result(tiny_vlm):
    whole = EmbodiedModel(tabletop_spec(tiny_vlm)).eval()
    chunked = EmbodiedModel(tabletop_spec(tiny_vlm, hf_batch_size=2)).eval()
    chunked.load_state_dict(whole.state_dict())
    obs = observations()
    with torch.no_grad():
        for a, b in zip(whole(obs), chunked(obs)):
            assert torch.allclose(a, b, atol=1e-5)


def test_sft_and_one_self_improvement_iteration_with_a_vlm_backbone(tmp_path):
    folder = save_tiny_idefics3(tmp_path / "smolvlm-tiny")
    config = load_config("language-table-quick", [
        f"runs_dir={tmp_path}", "name=hf", "data.episodes=4", "data.val_fraction=0.25", "model.encoder=hf", "improve.train=all",
        f"model.hf_model={folder}", "model.hidden=32", "model.layers=1", "sft.steps=2", "sft.batch_size=8",
        "sft.eval_every=2", "sft.checkpoint_every=2", "sft.lr=1e-3", "improve.iterations=1",
        "improve.steps_per_iteration=16", "improve.minibatch_size=16", "improve.eval_every=0", "improve.lr=1e-3",
        "fleet.robots=2", "env.max_episode_steps=30",
        *(["improve.guard=false"] if "guard" in {f.name for f in dataclasses.fields(ImproveConfig)} else [])])
    assert config.model.hf_dtype == "auto" and config.model.hf_device == "auto"
    collect_demos(config, progress=False)
    pretrained = EmbodiedModel(fresh_spec(config, folder)).encoder.vlm.state_dict()
    sft_path = sft(config, progress=False)
    tuned, _ = load_checkpoint(sft_path, expect_domain="language-table")
    assert tuned.spec.encoder == "hf" and tuned.spec.hf_model == str(folder.resolve())
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    sft_record = [r for r in records if r.get("stage") == "sft"][-1]
    assert all(math.isfinite(sft_record[k]) for k in ("train_bc", "train_stg", "val_bc", "val_stg"))
    assert changed(pretrained, tuned.encoder.vlm.state_dict())

    improved_path = improve(config, sft_path, progress=False)
    improved, meta = load_checkpoint(improved_path, expect_domain="language-table")
    assert meta["iteration"] == 1
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in records if r.get("stage") == "improve" and r.get("iteration") == 1][-1]
    assert it["env_steps"] >= 16 and it["updates"] >= 1
    assert math.isfinite(it["loss"]) and math.isfinite(it["grad_norm"]) and math.isfinite(it["mean_return"])
    assert changed(tuned.encoder.vlm.state_dict(), improved.encoder.vlm.state_dict())
    # the frozen reward model is the SFT checkpoint, untouched by Stage 2
    again, _ = load_checkpoint(sft_path)
    assert not changed(tuned.state_dict(), again.state_dict())


def fresh_spec(config, folder) -> ModelSpec:
    """The spec a fresh run builds (pretrained weights are read from ``folder``)."""
    from selfimprove.domains import make_env, model_spec

    env = make_env(config)
    try:
        return model_spec(config, env)
    finally:
        env.close()


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_config_validation_and_load_errors_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs model.hf_model"):
        load_config("language-table-quick", ["model.encoder=hf", "improve.train=all"])
    with pytest.raises(ConfigError, match="model.hf_dtype must be"):
        load_config("language-table-quick", ["model.encoder=hf", "model.hf_model=x/y", "model.hf_dtype=float16", "improve.train=all"])
    # the tabletop preset practises above the convs, which a VLM trunk has not: the error says what to set
    with pytest.raises(ConfigError, match="add --set improve.train=all"):
        load_config("language-table-quick", ["model.encoder=hf", "model.hf_model=x/y"])
    with pytest.raises(CheckpointError, match="no such folder"):
        EmbodiedModel(tabletop_spec(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="written by\\s+model.save_pretrained"):
        EmbodiedModel(tabletop_spec(tmp_path / "empty"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(CheckpointError, match="(?s)hub id 'nobody-here/no-such-vlm'.*reachable or the model is"):
        EmbodiedModel(tabletop_spec("nobody-here/no-such-vlm"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            EmbodiedModel(tabletop_spec(tmp_path / "missing", hf_device="cuda"))


def test_dtype_and_device_resolution():
    from selfimprove.model.hf_backbone import resolve_device, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_pooling_finds_the_last_real_token_with_either_padding_side():
    from selfimprove.model.hf_backbone import pool_hidden_states

    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool_hidden_states(hidden, right).tolist() == [[1.0, 0.5], [7.0, 5.5]]
    assert pool_hidden_states(hidden, left).tolist() == [[3.0, 2.5], [7.0, 5.5]]
    assert np.isfinite(pool_hidden_states(hidden, torch.zeros(2, 4)).numpy()).all()


def test_vlm_trunk_decodes_actions_one_dimension_after_another(tiny_vlm):
    model = EmbodiedModel(tabletop_spec(tiny_vlm, action_decoder="autoregressive")).eval()
    obs = observations()
    tokens = model.act(obs, 1.0, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 2) and tokens.min() >= 0 and tokens.max() < 41
    logits, _ = model(obs, tokens)
    logp = model.token_log_prob(logits, tokens)
    assert logp.shape == (3,) and torch.isfinite(logp).all() and (logp <= 0).all()
    # the second dimension's distribution depends on the first token (the first one's does not)
    other = tokens.clone()
    other[:, 0] = (other[:, 0] + 20) % 41
    moved, _ = model(obs, other)
    assert torch.allclose(moved[:, 0], logits[:, 0]) and not torch.allclose(moved[:, 1], logits[:, 1])
