"""The PyTorch implementation of every model `sweep` builds, for Hugging Face `transformers`.

This one file serves three uses, so that there is one PyTorch version of the project's
equations to keep right:
- `sweep export` ships it beside an exported trial (config.json's `auto_map` names it), so
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads any trial;
- `benches/torch_peer.py` builds its PyTorch peers of the bench configurations from it;
- the GPU cross-checks (`benches/export_check.py`) compare it with the losses a trial recorded.

The equations and initialization are those of components/src (each class names its file);
parameter names are the ones `sweep` saves, so an export's safetensors load as they are:
- the model: tied token embedding `wte`, the residual scheme's stream, blocks of
  (attention, FFN) each behind its own RMSNorm (eps 1e-6, learned gain), a final RMSNorm,
  logits x wte^T;
- attention (attention/core.rs): q, k, v, o projections without bias, heads of d_model /
  heads channels, key/value head j serving query heads j r .. j r + r - 1 (r = heads /
  kv_heads), optional QK-norm (RMSNorm without gain on every head), rotate-half RoPE
  (channel i pairs with i + D/2, frequency theta^(-i / (D/2))), causal softmax at
  1 / sqrt(head dim). GatedGqa multiplies the heads' output by sigmoid(x W_gate) (x the
  normed sublayer input; one gate per channel, or per head) before the output projection;
- FFN (ffn/): SwiGlu down(silu(gate x) * up x), Gelu down(gelu_erf(up x)), Relu2
  down(relu(up x)^2);
- residual (residual/): PreNorm x + F(x); Laurel skip beta (x + B A x) + alpha F(x);
  Hc and Mhc on n streams (B, T, n, C), the embedding replicated and the streams' mean read
  out, each sublayer x' = res x + post F(pre^T x) with Hc's learned (and, when dynamic,
  tanh-projected) coefficients or mHC's per-token sigmoid / Sinkhorn coefficients from the
  RMS-normed n C state, all in f32.

The model ignores `attention_mask` (sequences are not padded in `sweep`) and keeps no
key/value cache: `generate` recomputes the whole sequence at every new token.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

EPS = 1e-6
INIT_STD = 0.02


class SweepConfig(PretrainedConfig):
    """A trial's shape and components, as `sweep export` writes them.

    attention: {"kind": "Mha" | "Gqa" | "GatedGqa", "heads", "kv_heads", "rope",
    "rope_theta", "qk_norm", "gate": "Elementwise" | "Headwise"}; ffn: {"kind": "SwiGlu" |
    "Gelu" | "Relu2", "hidden"}; residual: {"kind": "PreNorm" | "Laurel" | "Hc" | "Mhc",
    "streams", "dynamic", "sinkhorn_iters", "rank", "rw"}.
    """

    model_type = "sweep"

    def __init__(
        self,
        vocab_size=256,
        d_model=64,
        n_layers=2,
        seq_len=128,
        attention=None,
        ffn=None,
        residual=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.hidden_size = d_model
        self.n_layers = n_layers
        self.num_hidden_layers = n_layers
        self.seq_len = seq_len
        self.max_position_embeddings = seq_len
        self.attention = attention or {"kind": "Gqa", "heads": 4, "kv_heads": 2}
        self.ffn = ffn or {"kind": "SwiGlu", "hidden": round(8 / 3 * d_model / 8) * 8}
        self.residual = residual or {"kind": "PreNorm"}
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)


def rms(x):
    """RMSNorm over the last dimension without a gain, computed in f32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def out_std(n_layers):
    """Output projections into the residual stream: 0.02 / sqrt(2 L), as in GPT-2."""
    return INIT_STD / math.sqrt(2 * n_layers)


class Norm(nn.Module):
    """RMSNorm with a learned gain (nn.rs RmsNorm)."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def reset_sweep_parameters(self):
        nn.init.ones_(self.gain)

    def forward(self, x):
        return rms(x) * self.gain.to(x.dtype)


def linear(d_in, d_out, std):
    lin = nn.Linear(d_in, d_out, bias=False)
    lin.sweep_std = std
    lin.sweep_hidden = True
    return lin


def rope_tables(head_dim, t, theta, device="cpu"):
    """cos and sin (T, D) of the rotate-half layout, angles in f64 as nn.rs builds them."""
    half = head_dim // 2
    i = torch.arange(head_dim, dtype=torch.float64, device=device) % half
    freq = theta ** (-i / half)
    ang = torch.arange(t, dtype=torch.float64, device=device)[:, None] * freq[None, :]
    return ang.cos().float(), ang.sin().float()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Mha, Gqa and GatedGqa (attention/core.rs, gated_gqa.rs)."""

    def __init__(self, c, n_layers, a):
        super().__init__()
        if a["kind"] not in ("Mha", "Gqa", "GatedGqa"):
            raise ValueError(f"unknown attention kind {a['kind']!r}")
        self.heads = a["heads"]
        self.kv_heads = a.get("kv_heads", self.heads) if a["kind"] != "Mha" else self.heads
        self.head_dim = c // self.heads
        self.rope_theta = a.get("rope_theta", 10000.0) if a.get("rope", True) else None

        self.qk_norm = a.get("qk_norm", False)
        kv = self.kv_heads * self.head_dim
        self.q = linear(c, c, INIT_STD)
        self.k = linear(c, kv, INIT_STD)
        self.v = linear(c, kv, INIT_STD)
        self.o = linear(c, c, out_std(n_layers))
        self.gate_kind = a.get("gate", "Elementwise") if a["kind"] == "GatedGqa" else None
        if self.gate_kind is not None:
            width = c if self.gate_kind == "Elementwise" else self.heads
            self.gate = linear(c, width, INIT_STD)
            self.gate.sweep_hidden = False  # Role::Gate: the AdamW group under Muon

    def forward(self, x, rope):
        """x (B, T, C) normed; rope (cos, sin) (T, head dim) when the attention rotates."""
        b, t, c = x.shape
        h, kv, hd = self.heads, self.kv_heads, self.head_dim
        q = self.q(x).view(b, t, h, hd).transpose(1, 2)
        k = self.k(x).view(b, t, kv, hd).transpose(1, 2)
        v = self.v(x).view(b, t, kv, hd).transpose(1, 2)
        if self.qk_norm:
            q, k = rms(q), rms(k)
        if self.rope_theta is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd), enable_gqa=kv != h
        )
        y = y.transpose(1, 2).reshape(b, t, c)
        if self.gate_kind == "Elementwise":
            y = y * torch.sigmoid(self.gate(x))
        elif self.gate_kind == "Headwise":
            y = (y.view(b, t, h, hd) * torch.sigmoid(self.gate(x))[..., None]).view(b, t, c)
        return self.o(y)


class Ffn(nn.Module):
    """SwiGlu, Gelu and Relu2 (ffn/)."""

    def __init__(self, c, n_layers, f):
        super().__init__()
        self.kind = f["kind"]
        if self.kind not in ("SwiGlu", "Gelu", "Relu2"):
            raise ValueError(f"unknown FFN kind {self.kind!r}")
        hidden = f["hidden"]
        if self.kind == "SwiGlu":
            self.gate = linear(c, hidden, INIT_STD)
        self.up = linear(c, hidden, INIT_STD)
        self.down = linear(hidden, c, out_std(n_layers))

    def forward(self, x):
        if self.kind == "SwiGlu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        u = self.up(x)
        if self.kind == "Gelu":
            return self.down(F.gelu(u))
        return self.down(torch.relu(u).square())


# Residual schemes: one connection module per sublayer k, each `forward(state, f)` with f the
# sublayer (its own norm included); `expand` and `reduce` move between the embedding and the
# stream state.


class Plain(nn.Module):
    """PreNorm (residual/prenorm.rs): x + F(x)."""

    def forward(self, state, f):
        return state + f(state)


class Laurel(nn.Module):
    """LAuReL (residual/laurel.rs): beta (x + B A x) + alpha F(x), each part optional."""

    def __init__(self, c, rank, rw):
        super().__init__()
        self.rank, self.rw = rank, rw
        if rank > 0:
            self.a = nn.Parameter(torch.empty(rank, c))
            self.b = nn.Parameter(torch.empty(c, rank))
        if rw:
            self.alpha = nn.Parameter(torch.ones(1))
            self.beta = nn.Parameter(torch.ones(1))
        self.reset_sweep_parameters()

    def reset_sweep_parameters(self):
        if self.rank > 0:
            nn.init.normal_(self.a, std=INIT_STD)
            nn.init.zeros_(self.b)
        if self.rw:
            nn.init.ones_(self.alpha)
            nn.init.ones_(self.beta)

    def forward(self, x, f):
        skip = x
        if self.rank > 0:
            skip = skip + (x @ self.a.t().to(x.dtype)) @ self.b.t().to(x.dtype)
        out = f(x)
        if self.rw:
            skip = skip * self.beta.to(x.dtype)
            out = out * self.alpha.to(x.dtype)
        return skip + out


def f32(x):
    """Autocast off: the residual schemes' coefficients are computed in f32 whatever the
    activations' dtype (under bf16 autocast too, as sweep computes them)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def connect(state, pre, res, post, f):
    """x' = res x + post F(pre^T x) on the stream axis of state (B, T, n, C); pre and post
    (.., n, 1), res (.., n, n), cast to the state's dtype (residual/mod.rs `connect`)."""
    dt = state.dtype
    h = (pre.to(dt).transpose(-1, -2) @ state).squeeze(2)
    out = f(h).unsqueeze(2)
    return res.to(dt) @ state + post.to(dt) @ out


class Hc(nn.Module):
    """Hyper-Connections (residual/hc.rs): h = A_m^T H, H' = A_r^T H + B^T F(h); dynamic adds
    s * tanh(rms(H) W) to each coefficient."""

    def __init__(self, k, n, c, dynamic):
        super().__init__()
        self.k, self.n, self.dynamic = k, n, dynamic
        self.a_m = nn.Parameter(torch.empty(n, 1))
        self.a_r = nn.Parameter(torch.empty(n, n))
        self.b = nn.Parameter(torch.empty(n, 1))
        if dynamic:
            self.w = nn.Parameter(torch.empty(c, n + 2))
            self.s_alpha = nn.Parameter(torch.empty(1))
            self.s_beta = nn.Parameter(torch.empty(1))
        self.reset_sweep_parameters()

    def reset_sweep_parameters(self):
        with torch.no_grad():
            self.a_m.zero_()
            self.a_m[self.k % self.n, 0] = 1.0
            self.a_r.copy_(torch.eye(self.n))
            self.b.fill_(1.0)
            if self.dynamic:
                self.w.zero_()
                self.s_alpha.fill_(0.01)
                self.s_beta.fill_(0.01)

    def forward(self, state, f):
        n = self.n
        a_m, a_r, b = self.a_m, self.a_r, self.b
        if self.dynamic:
            with f32(state):
                z = torch.tanh(rms(state.float()) @ self.w)  # (B, T, n, n + 2)
                a_m = self.s_alpha * z[..., 0:1] + a_m
                b = self.s_beta * z[..., 1:2] + b
                a_r = self.s_alpha * z[..., 2 : 2 + n] + a_r
        return connect(state, a_m, a_r.transpose(-1, -2), b, f)


def sinkhorn(logits, iters):
    """Sinkhorn-Knopp onto the doubly stochastic matrices (residual/mod.rs `sinkhorn`): the
    first round of columns then rows in the log domain, the rest on plain sums."""
    l = logits.float()
    l = l - torch.logsumexp(l, dim=-2, keepdim=True)
    l = l - torch.logsumexp(l, dim=-1, keepdim=True)
    m = l.exp()
    for _ in range(1, iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return m


class Mhc(nn.Module):
    """Manifold-constrained Hyper-Connections (residual/mhc.rs): per token, from
    x' = rms(vec(x)) over n C values, [pre | post | res] = a * (x' phi) + b; H_pre = sigmoid,
    H_post = 2 sigmoid, H_res = Sinkhorn; x_new = H_res x + H_post F(H_pre^T x)."""

    def __init__(self, k, n, c, iters):
        super().__init__()
        self.k, self.n, self.iters = k, n, iters
        self.phi = nn.Parameter(torch.empty(n * c, 2 * n + n * n))
        self.a = nn.Parameter(torch.empty(3))
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.reset_sweep_parameters()

    def reset_sweep_parameters(self):
        n = self.n
        with torch.no_grad():
            self.phi.zero_()
            self.a.fill_(0.01)
            self.b_pre.fill_(-3.0)
            self.b_pre[self.k % n] = 3.0
            self.b_post.zero_()
            self.b_res.copy_(6.0 * torch.eye(n) - 3.0)

    def forward(self, state, f):
        b, t, n, c = state.shape
        with f32(state):
            x = rms(state.float().reshape(b * t, n * c))
            z = x @ self.phi
            pre = torch.sigmoid(z[:, :n] * self.a[0] + self.b_pre)
            post = 2.0 * torch.sigmoid(z[:, n : 2 * n] * self.a[1] + self.b_post)
            res_logits = z[:, 2 * n :] * self.a[2] + self.b_res.flatten()
            res = sinkhorn(res_logits.view(b * t, n, n), self.iters)
        return connect(
            state,
            pre.view(b, t, n, 1),
            res.view(b, t, n, n),
            post.view(b, t, n, 1),
            f,
        )


def streams_of(r):
    return r.get("streams", 4) if r["kind"] in ("Hc", "Mhc") else 1


def residual_connections(r, c, n_sublayers):
    kind = r["kind"]
    if kind == "PreNorm":
        return nn.ModuleList([Plain() for _ in range(n_sublayers)])
    if kind == "Laurel":
        rank, rw = r.get("rank", 8), r.get("rw", False)
        return nn.ModuleList([Laurel(c, rank, rw) for _ in range(n_sublayers)])
    n = streams_of(r)
    if kind == "Hc":
        dynamic = r.get("dynamic", False)
        return nn.ModuleList([Hc(k, n, c, dynamic) for k in range(n_sublayers)])
    if kind == "Mhc":
        iters = r.get("sinkhorn_iters", 20)
        return nn.ModuleList([Mhc(k, n, c, iters) for k in range(n_sublayers)])
    raise ValueError(f"unknown residual kind {kind!r}")


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        c, layers = config.d_model, config.n_layers
        self.attn_norm = Norm(c)
        self.attn = Attention(c, layers, config.attention)
        self.ffn_norm = Norm(c)
        self.ffn = Ffn(c, layers, config.ffn)


class SweepForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SweepConfig
    base_model_prefix = "sweep"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        c = config.d_model
        self.streams = streams_of(config.residual)
        self.wte = nn.Parameter(torch.empty(config.vocab_size, c))
        self.residual = residual_connections(config.residual, c, 2 * config.n_layers)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm_f = Norm(c)
        # RoPE tables by (length, device): plain tensors, not buffers, so that loading (which
        # may build the model on the meta device first) never leaves them unset.
        self._rope_cache = {}
        self.post_init()

    def _init_weights(self, module):
        # The project's init (nn.rs, the residual files), not transformers' defaults.
        if module is self:
            nn.init.normal_(self.wte, std=INIT_STD)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=getattr(module, "sweep_std", INIT_STD))
        elif hasattr(module, "reset_sweep_parameters"):
            module.reset_sweep_parameters()

    @torch.compiler.disable
    def rope(self, t, device):
        """cos and sin (T, head dim) for every block's attention, built once per length and
        device. Outside any compiled graph: inside one, the f64 cos and sin would be fused
        into, and recomputed for, every query and key element."""
        attn = self.blocks[0].attn
        if attn.rope_theta is None:
            return None
        key = (t, str(device))
        if key not in self._rope_cache:
            tables = rope_tables(attn.head_dim, t, attn.rope_theta)
            self._rope_cache[key] = tuple(x.to(device) for x in tables)
        return self._rope_cache[key]

    def hidden_states(self, input_ids):
        """The final RMS-normed hidden states (B, T, C)."""
        rope = self.rope(input_ids.shape[1], input_ids.device)
        x = F.embedding(input_ids, self.wte)
        n = self.streams
        state = x if n == 1 and not isinstance(self.residual[0], (Hc, Mhc)) else (
            x.unsqueeze(2).expand(*x.shape[:2], n, x.shape[-1]).contiguous()
        )
        for l, blk in enumerate(self.blocks):
            state = self.residual[2 * l](state, lambda h: blk.attn(blk.attn_norm(h), rope))
            state = self.residual[2 * l + 1](state, lambda h: blk.ffn(blk.ffn_norm(h)))
        if state.dim() == 4:
            state = state.mean(2)
        return self.norm_f(state)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        x = self.hidden_states(input_ids)
        logits = x @ self.wte.t().to(x.dtype)
        loss = None
        if labels is not None:
            # transformers' convention: labels are the inputs, shifted here.
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten(),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # No key/value cache: every step reruns the whole sequence.
        return {"input_ids": input_ids}

    def hidden_matrices(self):
        """The 2-D hidden weights Muon/NorMuon train (Role::Hidden); the rest go to AdamW."""
        return [
            m.weight
            for m in self.modules()
            if isinstance(m, nn.Linear) and getattr(m, "sweep_hidden", False)
        ]
