"""The lm-evaluation-harness adapter: what lm-eval gets from a run against the model's own
numbers, computed directly, one request at a time (decode.score, the argmax of a full
forward, decode.generate)."""

import dataclasses
import importlib
import json
import os
import sys

import jax
import numpy as np
import pytest

from ar_jax import decode, train
from ar_jax.errors import ConfigError
from tests import helpers
from tests.helpers import REPO, tiny_config

pytest.importorskip(
  'lm_eval', reason="lm-eval is the optional [eval] extra: pip install -e '.[eval]'"
)
from lm_eval.api.instance import Instance  # noqa: E402

MAX_LEN = 32  # tiny_config's model.max_len
WORDS = 'the quick brown fox jumps over the lazy dog and runs'


@pytest.fixture(scope='module')
def hf_offline(tmp_path_factory):
  """Hugging Face datasets offline, caching in a temporary folder: the tasks read local files
  only. datasets reads its environment when first imported, so it is patched there too."""
  cache = tmp_path_factory.mktemp('hf')
  with pytest.MonkeyPatch.context() as mp:
    env = {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(cache)}
    for name, value in env.items():
      mp.setenv(name, value)
    import datasets.config

    mp.setattr(datasets.config, 'HF_DATASETS_OFFLINE', True)
    mp.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    mp.setattr(datasets.config, 'HF_DATASETS_CACHE', cache / 'datasets')
    yield env


@pytest.fixture(scope='module')
def harness(hf_offline):
  return importlib.import_module('ar_jax.interop.harness')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny transformer trained for a few steps on JSONL records: a character tokenizer with
  an end-of-sequence token (several documents)."""
  tmp = tmp_path_factory.mktemp('lm_harness')
  words = WORDS.split()
  lines = [' '.join(words[i % 7 :] + words[: i % 7]) for i in range(200)]
  corpus = tmp / 'corpus.jsonl'
  corpus.write_text(''.join(json.dumps({'text': line}) + '\n' for line in lines))
  workdir = str(tmp / 'run')
  steps = {'num_train_steps': 10, 'eval_every_steps': 10, 'checkpoint_every_steps': 10}
  steps['sample.prompt'] = 'the '  # the end-of-run sample's: in the vocabulary
  train.train_and_evaluate(tiny_config(corpus, **steps), workdir)
  return workdir


@pytest.fixture(scope='module')
def lm(harness, run):
  lm = harness.ArJaxLM(run, batch_size=4)
  assert lm.max_length == MAX_LEN and lm.tokenizer.eos_id is not None
  return lm


@pytest.fixture(scope='module')
def direct(lm):
  """(log p(continuation | context) by decode.score of the pair alone, whether each of its
  tokens is the argmax of one full forward), left-truncated to the model's context. Padded to
  one width (zeros after a sequence change nothing: causal), each compiles once."""
  forward = jax.jit(lambda t: jax.nn.log_softmax(lm.model.apply({'params': lm.params}, t)))
  pad = lambda row: np.pad(row, (0, MAX_LEN - len(row)))[None]

  def score(context: list[int], continuation: list[int]) -> tuple[float, bool]:
    tokens = (context + continuation)[-MAX_LEN:]
    start = len(tokens) - len(continuation)
    total, _ = decode.score(
      lm.model,
      lm.params,
      pad(tokens[:start]),
      pad(continuation),
      prompt_lengths=[start],
      continuation_lengths=[len(continuation)],
    )
    argmax = np.argmax(np.asarray(forward(pad(tokens))[0]), axis=-1)
    return float(total[0]), all(argmax[t - 1] == tokens[t] for t in range(start, len(tokens)))

  return score


def encode(lm, text: str) -> list[int]:
  return lm.tokenizer.encode(text).tolist()


def write_task(tmp_path, docs) -> str:
  """A multiple-choice task, 'tiny_choice', over docs in a local JSONL file."""
  (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  (tasks / 'tiny_choice.yaml').write_text(
    'task: tiny_choice\n'
    'dataset_path: json\n'
    f'dataset_kwargs: {{data_files: {{test: {tmp_path / "docs.jsonl"}}}}}\n'
    'test_split: test\n'
    'output_type: multiple_choice\n'
    "doc_to_text: '{{question}}'\n"
    'doc_to_target: answer\n'
    'doc_to_choice: choices\n'
    'metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n'
  )
  return str(tasks)


DOCS = [
  {'question': 'the quick brown', 'choices': ['fox', 'dog', 'lazy runs'], 'answer': 0},
  {'question': 'over the lazy', 'choices': ['dog', 'fox'], 'answer': 0},
  {'question': 'the lazy dog and ', 'choices': ['runs', 'jumps over'], 'answer': 1},  # a space
  # Longer than the model's context with any choice: left-truncated.
  {
    'question': 'jumps over the lazy dog and runs the quick',
    'choices': ['brown', 'fox'],
    'answer': 1,
  },
  {'question': 'dog', 'choices': ['and', 'the', 'over the quick brown'], 'answer': 2},
]


def choice_scores(lm, direct, doc) -> list[tuple[float, bool]]:
  """Each choice after the question and lm-eval's target delimiter (a space), the context's
  trailing spaces moved to the continuation (as lm-eval splits a pair), scored directly."""
  context = doc['question'].rstrip()
  spaces = doc['question'][len(context) :] + ' '
  return [direct(encode(lm, context), encode(lm, spaces + c)) for c in doc['choices']]


def accuracy(lm, direct) -> float:
  """The fraction of DOCS whose answer has the highest directly computed log-likelihood."""
  return np.mean(
    [np.argmax([s[0] for s in choice_scores(lm, direct, d)]) == d['answer'] for d in DOCS]
  )


def test_multiple_choice_is_scored_as_the_model_scores_each_choice(harness, lm, direct, tmp_path):
  results = harness.evaluate(
    lm,
    ['tiny_choice'],
    include_path=write_task(tmp_path, DOCS),
    builtin_tasks=False,
    log_samples=True,
  )
  samples = sorted(results['samples']['tiny_choice'], key=lambda s: s['doc_id'])
  assert len(samples) == len(DOCS)
  for doc, sample in zip(DOCS, samples, strict=True):
    assert sample['arguments'] == [(doc['question'], ' ' + c) for c in doc['choices']]
    for got, expected in zip(sample['filtered_resps'], choice_scores(lm, direct, doc), strict=True):
      assert got[0] == pytest.approx(expected[0], abs=1e-4) and got[1] == expected[1]
  assert results['results']['tiny_choice']['acc,none'] == pytest.approx(accuracy(lm, direct))


PROMPTS = ['the quick', 'over the lazy dog and the quick brown']  # the second: cut to 24 tokens
NEW = 8  # tokens generated after each prompt


@pytest.fixture(scope='module')
def greedy(lm) -> dict[str, str]:
  """Each of PROMPTS's greedy continuation by decode.generate alone, after as many of its
  last tokens as leave room for NEW more in the model's context."""
  texts = {}
  for prompt in PROMPTS:
    ids = encode(lm, prompt)[-(MAX_LEN - NEW) :]
    out = decode.generate(
      lm.model,
      lm.params,
      [ids],
      NEW,
      jax.random.key(0),
      temperature=0.0,
      eos_id=lm.tokenizer.eos_id,
    )
    tokens, end = np.asarray(out.tokens)[0], int(out.lengths[0])
    texts[prompt] = lm.tokenizer.decode(tokens[len(ids) : end])
  return texts


def test_an_empty_context_is_the_end_of_sequence_token_and_greedy_is_the_argmax(lm, direct, greedy):
  prompt, continuation = encode(lm, 'the quick'), greedy['the quick'][:4]
  requests = [('the quick', continuation), ('', 'the fox'), ('the quick', continuation + 'z')]
  got = lm.loglikelihood([Instance('loglikelihood', {}, r, i) for i, r in enumerate(requests)])
  eos = [lm.tokenizer.eos_id]
  contexts = [prompt, eos, prompt]
  for (_, text), context, (log_p, is_greedy) in zip(requests, contexts, got, strict=True):
    expected = direct(context, encode(lm, text))
    assert log_p == pytest.approx(expected[0], abs=1e-4) and is_greedy == expected[1]
  assert got[0][1], 'the greedy continuation is not greedy'


def test_rolling_loglikelihood_is_the_text_in_disjoint_windows_of_the_context(lm, direct):
  short, long = 'the lazy dog', (WORDS + ' ' + WORDS)[:70]
  got = lm.loglikelihood_rolling(
    [Instance('loglikelihood_rolling', {}, (t,), i) for i, t in enumerate([short, long, ''])]
  )
  eos = [lm.tokenizer.eos_id]
  assert got[0] == pytest.approx(direct(eos, encode(lm, short))[0], abs=1e-4)
  # Windows of 32 tokens, each predicting tokens no other window predicts: 31 after eos, the
  # next 31 after the one token before them, and the last 8 after the 24 before them.
  t = encode(lm, long)
  windows = [(eos, t[:31]), (t[30:31], t[31:62]), (t[38:62], t[62:70])]
  assert got[1] == pytest.approx(sum(direct(c, p)[0] for c, p in windows), abs=1e-3)
  assert got[2] == 0.0


def test_generation_is_greedy_decoding_cut_at_the_first_stop_string(lm, greedy):
  stop = greedy[PROMPTS[0]][2]  # occurs in the first text: it is cut there
  kwargs = [
    {'until': [stop, 'zz'], 'max_gen_toks': NEW},
    {'until': stop, 'max_gen_toks': NEW, 'do_sample': False},
  ]
  requests = [(p, k) for k in kwargs for p in PROMPTS]
  got = lm.generate_until([Instance('generate_until', {}, r, i) for i, r in enumerate(requests)])
  expected = [greedy[p].split(stop)[0] for p in PROMPTS]
  assert len(expected[0]) == 2
  assert got == expected + expected


def test_bad_input_is_named(harness, lm, tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match='is not a run directory'):
    harness.ArJaxLM(str(tmp_path))
  with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 'auto'"):
    harness.ArJaxLM(str(tmp_path), batch_size='auto')
  with pytest.raises(ConfigError, match='no lm-eval task no_such_task: not a task, group'):
    harness.evaluate(
      lm, ['no_such_task'], include_path=write_task(tmp_path, DOCS), builtin_tasks=False
    )
  request = Instance('generate_until', {}, ('the', {'max_gen_toks': MAX_LEN}), 0)
  with pytest.raises(ConfigError, match='max_gen_toks=32 leaves no room for a prompt'):
    lm.generate_until([request])
  monkeypatch.setattr(lm, 'tokenizer', dataclasses.replace(lm.tokenizer, eos_id=None))
  with pytest.raises(ConfigError, match='has no end-of-sequence token'):
    lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, ('the dog',), 0)])


def test_the_model_is_registered_with_lm_eval_and_built_from_its_arg_string(harness, run):
  from lm_eval.api.registry import get_model

  cls = get_model('ar_jax')
  lm = cls.create_from_arg_string(f'workdir={run},max_length=16', {'batch_size': '2'})
  assert (lm.batch_size, lm.max_length) == (2, 16)
  with pytest.raises(ConfigError, match=r"max_length must be in \[2, 32\] \(the model's context\)"):
    cls.create_from_arg_string(f'workdir={run},max_length=64')


def test_the_command_prints_and_writes_the_results(run, lm, direct, hf_offline, tmp_path):
  tasks = write_task(tmp_path, DOCS)
  # The same devices as this process (XLA_FLAGS): its compiled programs are in the test run's
  # compilation cache.
  out = helpers.run(
    [
      sys.executable,
      '-m',
      'ar_jax.lm_harness',
      f'--workdir={run}',
      '--tasks=tiny_choice',
      f'--include_path={tasks}',
      '--builtin_tasks=false',
      '--batch_size=4',
      f'--output={tmp_path / "results.json"}',
    ],
    cwd=REPO,
    env=os.environ | hf_offline,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert '|tiny_choice|' in out.stdout
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['results']['tiny_choice']['acc,none'] == pytest.approx(accuracy(lm, direct))


def test_without_lm_eval_the_command_names_the_extra(tmp_path):
  fake = tmp_path / 'lm_eval'
  fake.mkdir()
  (fake / '__init__.py').write_text("raise ImportError('No module named lm_eval')\n")
  env = helpers.subprocess_env() | {'PYTHONPATH': str(tmp_path)}
  out = helpers.run(
    [sys.executable, '-m', 'ar_jax.lm_harness', '--workdir=x', '--tasks=y'],
    cwd=REPO,
    env=env,
    timeout=120,
  )
  assert out.returncode != 0
  assert out.stderr.strip().splitlines() == [
    "error: ar_jax.lm_harness needs lm-eval (No module named lm_eval): pip install -e '.[eval]'"
  ]
