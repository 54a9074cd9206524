"""Qwen-Audio's audio encoder (model/audio.py) against a float64 reference written here from qwen-family.md §7.2–§7.5
with explicit loops: the two convolutions tap by tap, per-head attention with q and k each scaled by d^(−1/4), pairs of
rows averaged, BOS and EOS around the tokens. A scaled-down encoder keeps the real 80 mels and 1500 positions, so clips
run from the shortest the original encodes (3 frames) to the full 30 s (3000 frames)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qwen_engine.catalog import audio_shapes
from qwen_engine.config import AudioConfig
from qwen_engine.errors import QwenError
from qwen_engine.model.audio import AudioEncoder, sinusoids
from tiny import official_audio_state

CONFIG = AudioConfig(n_mels=80, n_ctx=1500, n_state=64, n_head=4, n_layer=2, output_dim=96)
FRAMES = 3000  # every log-mel is 30 s long, the audio padded (§7.3)


def span(mel_len: int) -> int:
    """§7.3: conv2 halves the frames, the pooling halves them again, BOS and EOS are added."""
    after_cnn = (mel_len - 1) // 2 + 1
    audio_token_num = (after_cnn - 2) // 2 + 1
    return audio_token_num + 2


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + 1e-5) * weight + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """Kernel 3, one zero frame of padding each side; x [in, T] → [T_out, out], tap by tap."""
    padded = torch.cat([torch.zeros_like(x[:, :1]), x, torch.zeros_like(x[:, :1])], dim=1)
    outputs = (padded.shape[1] - 3) // stride + 1
    return bias + sum(padded[:, tap : tap + stride * outputs : stride].T @ weight[:, :, tap].T for tap in range(3))


def reference(state: dict[str, torch.Tensor], config: AudioConfig, mel: torch.Tensor, mel_len: int) -> torch.Tensor:
    """One clip's span, in float64, from the description alone."""
    s = {name: tensor.double() for name, tensor in state.items()}
    heads, hd = config.n_head, config.n_state // config.n_head
    read = mel_len + mel_len % 2  # an odd mel_len reads one frame past the audio (§7.5)
    x = gelu(conv(mel.double()[:, :read], s["conv1.weight"], s["conv1.bias"], stride=1))
    x = gelu(conv(x.T, s["conv2.weight"], s["conv2.bias"], stride=2))
    x = x + s["positional_embedding"][: x.shape[0]]
    for n in range(config.n_layer):
        p = f"blocks.{n}."
        h = layer_norm(x, s[p + "attn_ln.weight"], s[p + "attn_ln.bias"])
        q = h @ s[p + "attn.query.weight"].T + s[p + "attn.query.bias"]
        k = h @ s[p + "attn.key.weight"].T  # no bias
        v = h @ s[p + "attn.value.weight"].T + s[p + "attn.value.bias"]
        heads_out = []
        for head in range(heads):
            cols = slice(head * hd, (head + 1) * hd)
            scores = (q[:, cols] * hd**-0.25) @ (k[:, cols] * hd**-0.25).T
            heads_out.append(torch.softmax(scores, dim=-1) @ v[:, cols])
        x = x + torch.cat(heads_out, dim=1) @ s[p + "attn.out.weight"].T + s[p + "attn.out.bias"]
        h = layer_norm(x, s[p + "mlp_ln.weight"], s[p + "mlp_ln.bias"])
        hidden = gelu(h @ s[p + "mlp.0.weight"].T + s[p + "mlp.0.bias"])
        x = x + hidden @ s[p + "mlp.2.weight"].T + s[p + "mlp.2.bias"]
    pooled = torch.stack([(x[2 * i] + x[2 * i + 1]) / 2 for i in range(x.shape[0] // 2)])
    tokens = layer_norm(pooled, s["ln_post.weight"], s["ln_post.bias"]) @ s["proj.weight"].T + s["proj.bias"]
    bos, eos = s["audio_bos_eos_token.weight"]
    return torch.cat([bos[None], tokens, eos[None]])


def log_mel(seed: int) -> torch.Tensor:
    """Log-mel-like values: (log10 + 4)/4 of a spectrum, floored 8 decades under its maximum (§7.3)."""
    values = torch.randn(CONFIG.n_mels, FRAMES, generator=torch.Generator().manual_seed(seed)) * 0.5 - 0.5
    return torch.maximum(values, values.max() - 2.0)


def load(state: dict[str, torch.Tensor], config: AudioConfig = CONFIG) -> AudioEncoder:
    with torch.device("meta"):
        encoder = AudioEncoder(config)
    encoder.load_state_dict(state, assign=True)  # the checkpoint's names, prefix stripped, load as they are
    return encoder.eval()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    tensors = official_audio_state(CONFIG)
    # Checkpoints store the table in bfloat16 and the model reads the stored values (§7.5): the reference uses them too.
    tensors["positional_embedding"] = tensors["positional_embedding"].bfloat16().float()
    return tensors


@pytest.mark.parametrize("mel_len", [3, 4, 5, 157, 600, 2999, 3000])
def test_the_encoder_matches_the_float64_reference(state, mel_len: int) -> None:
    encoder = load(state)
    mel = log_mel(mel_len)
    with torch.inference_mode():
        ours = encoder(mel, mel_len)
    expected = reference(state, CONFIG, mel, mel_len)
    assert ours.dtype == torch.float32 and ours.shape == (span(mel_len), CONFIG.output_dim) == expected.shape
    assert (ours.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_spans_of_the_shortest_and_the_longest_clip() -> None:
    """480 samples (3 frames) is the shortest clip the original encodes, span 3; 30 s gives 750 tokens + 2 (§7.3, §7.5)."""
    assert [span(samples // 160) for samples in (480, 1119, 1120, 16000, 480000)] == [3, 3, 4, 27, 752]


def test_only_the_frames_the_original_reads_matter(state) -> None:
    """An odd mel_len reads frame mel_len, one past the audio; nothing after 2·after_cnn frames is read (§7.5)."""
    encoder, mel_len = load(state), 157
    mel = log_mel(3)
    past, beyond = mel.clone(), mel.clone()
    past[:, mel_len] += 1.0
    beyond[:, mel_len + 1 :] += 1.0
    with torch.inference_mode():
        ours = encoder(mel, mel_len)
        assert not torch.allclose(encoder(past, mel_len), ours)
        assert torch.equal(encoder(beyond, mel_len), ours)


def test_bfloat16_stays_close_to_float32(state) -> None:
    exact = load(state)
    half = load({name: tensor.bfloat16() for name, tensor in state.items()})
    mel = log_mel(4)  # float32 in: cast to the module's dtype
    with torch.inference_mode():
        for mel_len in (600, 3000):
            ours = half(mel, mel_len)
            expected = exact(mel, mel_len)
            error = ours.float() - expected
            # bfloat16 keeps 8 bits: ~0.5% already after conv1 (the log-mel itself rounded), under 1% at the end.
            assert ours.dtype == torch.bfloat16
            assert error.norm() <= 2e-2 * expected.norm() and error.abs().max() <= 3e-2 * expected.abs().max()


@pytest.mark.parametrize("mel_len", [0, 2, 3001])
def test_clips_the_original_cannot_encode_are_refused(state, mel_len: int) -> None:
    """Under 480 samples the original crashes (§7.5); past 30 s there are no frames or positions left."""
    with pytest.raises(QwenError, match="cannot be encoded"):
        load(state)(log_mel(5), mel_len)


def test_sinusoids_layout() -> None:
    """§7.2: row t = [sin(t·ω_k)…, cos(t·ω_k)…], ω_k = exp(−k·ln(10000)/(C/2 − 1)); the real table to float32 accuracy."""
    table = sinusoids(5, 8)
    omega = [math.exp(-k * math.log(10000) / 3) for k in range(4)]
    expected = [[math.sin(t * w) for w in omega] + [math.cos(t * w) for w in omega] for t in range(5)]
    assert torch.allclose(table, torch.tensor(expected), atol=1e-6)
    real = sinusoids(1500, 1280).double()
    t = torch.arange(1500, dtype=torch.float64)[:, None]
    omega = torch.exp(-torch.arange(640, dtype=torch.float64) * math.log(10000) / 639)[None, :]
    assert real.shape == (1500, 1280)
    assert (real - torch.cat([(t * omega).sin(), (t * omega).cos()], dim=1)).abs().max() < 3e-4


def test_the_real_config_and_its_shapes() -> None:
    """Qwen-Audio's encoder (§7.1, §7.2): 640,119,808 parameters besides the stored [1500, 1280] table, under the
    names and shapes the catalog counts (`audio.*`)."""
    config = AudioConfig()
    with torch.device("meta"):
        encoder = AudioEncoder(config)
    assert sum(p.numel() for p in encoder.parameters()) == 640_119_808
    shapes = {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}
    assert shapes.pop("positional_embedding") == (1500, 1280)  # a persistent buffer: in the state dict, not a parameter
    catalog = audio_shapes(config, llm_hidden=config.output_dim)
    assert shapes == {name.removeprefix("audio."): shape for name, shape in catalog.items()}


def test_configs_without_pooling_or_bos_eos_are_refused() -> None:
    for change in ({"avg_pool": False}, {"add_audio_bos_eos_token": False}):
        with pytest.raises(QwenError, match="avg_pool and add_audio_bos_eos_token"):
            AudioEncoder(dataclasses.replace(CONFIG, **change))
