"""The PyTorch side of bench/vs_pytorch.py: ar_jax's models written in PyTorch at the same
shapes, their training throughput, and the nanogpt_cpu recipe end to end.

PyTorch is imported inside the functions: bench/vs_pytorch.py --tiny runs without it.
"""

import functools
import math
import os
import statistics
import time

import numpy as np

VOCAB = 65  # tiny shakespeare's characters


def _modules():
  import torch
  from torch import nn
  from torch.nn import functional as F

  class Block(nn.Module):
    """nanoGPT's block: x + attn(LN(x)), x + mlp(LN(x)), tanh GELU (as ar_jax's)."""

    def __init__(self, d: int, heads: int, bias: bool):
      super().__init__()
      self.heads = heads
      self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
      self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
      self.fc, self.proj = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
      B, T, D = x.shape
      q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
      q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, D))
      return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate='tanh'))

  class GPT(nn.Module):
    def __init__(self, layers=4, heads=4, d=128, context=64, vocab=VOCAB, bias=False):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
      self.blocks = nn.ModuleList(Block(d, heads, bias) for _ in range(layers))
      self.ln_f = nn.LayerNorm(d, bias=bias)
      for p in self.parameters():
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else None

    def forward(self, idx, carry=None):
      x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
      for block in self.blocks:
        x = block(x)
      return self.ln_f(x) @ self.wte.weight.T, None  # tied output layer

  class RNNLM(nn.Module):
    def __init__(self, cell: str, width: int = 512):
      super().__init__()
      self.embed = nn.Embedding(VOCAB, 128)
      self.rnn = (nn.LSTM if cell == 'lstm' else nn.GRU)(128, width, 2, batch_first=True)
      self.head = nn.Linear(width, VOCAB)

    def forward(self, idx, carry=None):
      h, carry = self.rnn(self.embed(idx), carry)
      return self.head(h), carry

  class ConvLM(nn.Module):
    """shakespeare_char's model=conv: 8 causal convs (kernel 5, 256 channels), ReLU, a 1x1
    residual projection each; a ReLU 1x1 hidden head."""

    def __init__(self, channels=256, layers=8, kernel=5):
      super().__init__()
      self.kernel = kernel
      self.embed = nn.Embedding(VOCAB, channels)
      self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel) for _ in range(layers))
      self.residual = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in range(layers))
      self.hidden, self.head = nn.Linear(channels, channels), nn.Linear(channels, VOCAB)

    def forward(self, idx, carry=None):
      x = self.embed(idx).transpose(1, 2)
      for conv, res in zip(self.convs, self.residual, strict=True):
        x = x + res(F.relu(conv(F.pad(x, (self.kernel - 1, 0)))))
      return self.head(F.relu(self.hidden(F.relu(x.transpose(1, 2))))), None

  return (
    torch,
    F,
    {
      'gpt': GPT,
      'lstm': functools.partial(RNNLM, 'lstm'),
      'gru': functools.partial(RNNLM, 'gru'),
      'conv': ConvLM,
    },
  )


def _optimizer(torch, model, lr=1e-3, b2=0.99, weight_decay=0.1):
  """AdamW with decay on matrices and embeddings only, as ar_jax (and nanoGPT) do; the
  fused kernel where this PyTorch build has one for the CPU."""
  decay = [p for p in model.parameters() if p.dim() >= 2]
  rest = [p for p in model.parameters() if p.dim() < 2]
  groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0}]
  try:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, b2), eps=1e-8, fused=True)
  except (RuntimeError, TypeError):
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, b2), eps=1e-8, foreach=True)


def _step(torch, F, model, opt, x, y, carry):
  logits, carry = model(x, carry)
  loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
  opt.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()
  # Stateful recurrent training: the next batch continues from the state, without gradient.
  if carry is not None:  # an LSTM's (h, c), or a GRU's h
    carry = tuple(c.detach() for c in carry) if isinstance(carry, tuple) else carry.detach()
  return loss, carry


def rate(name: str, batch: int, seq_len: int, steps: int, repeats: int) -> float:
  """Training tokens/s of the named model on random tokens."""
  torch, F, models = _modules()
  torch.manual_seed(0)
  model = models[name]()
  opt = _optimizer(torch, model, lr=2e-3 if name in ('lstm', 'gru') else 1e-3)
  tokens = torch.randint(0, VOCAB, (batch, seq_len + 1))
  x, y = tokens[:, :-1], tokens[:, 1:]
  carry = None
  for _ in range(5):
    _, carry = _step(torch, F, model, opt, x, y, carry)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      _, carry = _step(torch, F, model, opt, x, y, carry)
    times.append(time.perf_counter() - start)
  return steps * batch * seq_len / statistics.median(times)


def recipe(text_path: str, workdir: str) -> None:
  """nanogpt_cpu end to end, as ar_jax's preset runs it: char vocabulary, 90/10 split by
  position, 2,000 AdamW steps of 12 random windows of 64 (warmup 100, cosine to 1e-4),
  every token of the validation split evaluated at steps 500, 1000, 1500 and 2000, a
  checkpoint at 1000 and 2000, and a 63-character sample at the end."""
  torch, F, models = _modules()
  torch.manual_seed(0)
  with open(text_path) as f:
    text = f.read()
  chars = sorted(set(text))
  ids = np.searchsorted(np.array(chars), np.array(list(text))).astype(np.int64)
  cut = int(0.9 * len(ids))
  train, val = torch.from_numpy(ids[:cut]), torch.from_numpy(ids[cut:])
  model = models['gpt']()
  opt = _optimizer(torch, model)
  rng = np.random.default_rng(0)
  B, T, steps = 12, 64, 2000

  def lr(step):
    if step < 100:
      return 1e-3 * step / 100
    progress = (step - 100) / (steps - 100)
    return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))

  @torch.no_grad()
  def evaluate():
    """Every target of the validation split once: full windows of T in batches of B, then
    the shorter last one."""
    model.eval()
    full = (len(val) - 1) // T
    inputs, targets = val[: full * T].view(full, T), val[1 : full * T + 1].view(full, T)
    nats = 0.0
    for i in range(0, full, B):
      logits, _ = model(inputs[i : i + B])
      nats += F.cross_entropy(
        logits.reshape(-1, VOCAB), targets[i : i + B].reshape(-1), reduction='sum'
      ).item()
    if len(val) - 1 > full * T:
      logits, _ = model(val[None, full * T : -1])
      nats += F.cross_entropy(logits[0], val[full * T + 1 :], reduction='sum').item()
    model.train()
    return nats / (len(val) - 1)

  for step in range(1, steps + 1):
    for group in opt.param_groups:
      group['lr'] = lr(step - 1)
    starts = torch.from_numpy(rng.integers(0, len(train) - T - 1, B))
    batch = torch.stack([train[s : s + T + 1] for s in starts])
    loss, _ = _step(torch, F, model, opt, batch[:, :-1], batch[:, 1:], None)
    if step % 100 == 0:
      print(f'step {step} loss {loss.item():.4f}')
    if step % 500 == 0:
      val_loss = evaluate()
      print(f'step {step} val {val_loss:.4f}')
    if step % 1000 == 0:
      torch.save(
        {'model': model.state_dict(), 'opt': opt.state_dict()}, os.path.join(workdir, 'ckpt.pt')
      )
  with torch.no_grad():
    idx = torch.tensor([[chars.index('\n')]])
    for _ in range(T - 1):
      probs = F.softmax(model(idx)[0][:, -1] / 0.8, dim=-1)
      idx = torch.cat([idx, torch.multinomial(probs, 1)], dim=1)
  print(f'val loss {val_loss:.4f}')


def gpt2_rate(sizes, batch: int, repeats: int) -> float:
  """Training tokens/s of GPT-2 (sizes: bench/gpu.py's Sizes) on the GPU, as nanoGPT trains it
  there: torch.compile, bf16 autocast, fused AdamW, flash attention."""
  torch, F, models = _modules()
  s = sizes
  model = models['gpt'](s.layers, s.heads, s.d_model, s.context, s.vocab, bias=True).cuda()
  opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), fused=True)
  compiled = torch.compile(model)
  tokens = torch.randint(0, s.vocab, (batch, s.context + 1), device='cuda')

  def step():
    with torch.autocast('cuda', dtype=torch.bfloat16):
      _step(torch, F, compiled, opt, tokens[:, :-1], tokens[:, 1:], None)

  return _timed(torch, step, batch * s.context, s.steps, repeats)


def lstm_gpu_rate(width: int, batch: int, seq_len: int, steps: int, repeats: int) -> float:
  """Training tokens/s of the 2-layer LSTM LM on the GPU (cuDNN), bf16 autocast, stateful."""
  torch, F, models = _modules()
  model = models['lstm'](width).cuda()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)
  tokens = torch.randint(0, VOCAB, (batch, seq_len + 1), device='cuda')
  carry = [None]

  def step():
    with torch.autocast('cuda', dtype=torch.bfloat16):
      carry[0] = _step(torch, F, model, opt, tokens[:, :-1], tokens[:, 1:], carry[0])[1]

  return _timed(torch, step, batch * seq_len, steps, repeats)


def _timed(torch, step, tokens_per_step: int, steps: int, repeats: int) -> float:
  for _ in range(3):  # compile and warm up
    step()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  return steps * tokens_per_step / statistics.median(times)
