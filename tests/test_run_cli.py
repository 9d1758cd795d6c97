"""`moetier run` and `moetier stats record` through the real console script: a tiny Qwen3-MoE checkpoint
with a tokenizer built here (byte-level BPE needs 256 symbols; the tiny models have 128 ids, so a
Metaspace BPE over a small alphabet), the text streamed to stdout, the rates and tiers on stderr, and the
errors a user can cause as one line and exit status 2."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_usage_error
from cli_helpers import moetier as cli

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

PROMPT = "def fibonacci(n):"
CORPUS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
          "The quick brown fox jumps over the lazy dog.", "print('hello world')", "for i in range(10): x += i"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
THREADS = ("--threads", "1")  # tiny model: one thread is fastest, and the machine is shared


def save_tokenizer(folder, vocab_size: int, chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 8, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    assert len(fast) <= vocab_size
    return fast


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(with a chat template, without any tokenizer, with a tokenizer but no chat template)."""
    from moetier.plugins import load_registry

    fam = load_registry().family("qwen")
    dirs = []
    for name in ("chat", "bare", "plain"):
        d = tmp_path_factory.mktemp(name)
        fam.tiny("Qwen3-30B-A3B", str(d), seed=3)
        dirs.append(d)
    save_tokenizer(dirs[0], 120, chat=True)
    save_tokenizer(dirs[2], 120, chat=False)
    return dirs


def stat_lines(stderr: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stderr.splitlines() if line.split() and line.split()[0] in
            ("prefill", "decode", "experts")}


def test_run_streams_the_greedy_tokens_and_reports_rates(model_dirs):
    import moetier
    from moetier.integrations.transformers.generation import generate
    from transformers import AutoTokenizer

    folder = model_dirs[0]
    r = cli("run", folder, "--prompt", PROMPT, "--max-new-tokens", 12, "--dtype", "fp32", *THREADS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = stat_lines(r.stderr)
    assert set(lines) == {"prefill", "decode", "experts"}, r.stderr
    tok = AutoTokenizer.from_pretrained(str(folder))
    n_prompt = len(tok(PROMPT)["input_ids"])
    assert lines["prefill"].startswith(f"prefill  {n_prompt} tokens in ") and lines["prefill"].endswith("tokens/s")
    assert "tokens/s" in lines["decode"]
    assert "cpu:numa0" in lines["experts"] and "KiB" in lines["experts"]
    # What was streamed is the model's greedy continuation, computed here through the Python API.
    torch.set_num_threads(1)
    model = moetier.load(folder, dtype=torch.float32, threads=1, progress=False)
    try:
        new, times = generate(model, torch.tensor([tok(PROMPT)["input_ids"]]), max_new_tokens=12,
                              pad_token_id=tok.eos_token_id)
    finally:
        model.moetier_experts.close()
    assert times.prompt_tokens == n_prompt and 1 <= times.new_tokens <= 12
    expected = tok.decode(new, skip_special_tokens=True)
    assert expected.strip(), "the continuation decodes to no text: the comparison would prove nothing"
    assert r.stdout.strip() == expected.strip()
    assert f"decode   {times.new_tokens - 1} tokens in" in lines["decode"]


def test_chat_uses_the_tokenizer_template(model_dirs):
    from transformers import AutoTokenizer

    folder = model_dirs[0]
    tok = AutoTokenizer.from_pretrained(str(folder))
    templated = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert len(templated) != len(tok(PROMPT)["input_ids"])
    r = cli("run", folder, "--prompt", PROMPT, "--chat", "--max-new-tokens", 3, "--temperature", "0.8",
                "--seed", "7", *THREADS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert stat_lines(r.stderr)["prefill"].startswith(f"prefill  {len(templated)} tokens in ")


def test_chat_without_a_template_is_a_usage_error(model_dirs):
    r = cli("run", model_dirs[2], "--prompt", PROMPT, "--chat", *THREADS)
    assert_usage_error(r, "no chat template")


def test_model_without_a_tokenizer(model_dirs):
    r = cli("run", model_dirs[1], "--prompt", PROMPT)
    assert_usage_error(r, "no tokenizer", "tokenizer.json")


def test_missing_model(tmp_path):
    assert_usage_error(cli("run", tmp_path / "nowhere", "--prompt", PROMPT), "no such file or folder")
    (tmp_path / "empty").mkdir()
    assert_usage_error(cli("run", tmp_path / "empty", "--prompt", PROMPT), "has no config.json")


@pytest.mark.parametrize("args,needle", [
    ((), "--prompt"),
    (("--prompt", PROMPT, "--max-new-tokens", "0"), "--max-new-tokens"),
    (("--prompt", PROMPT, "--max-new-tokens", "many"), "--max-new-tokens"),
    (("--prompt", PROMPT, "--temperature", "-1"), "--temperature"),
    (("--prompt", "   "), "--prompt is empty"),
])
def test_usage_errors(model_dirs, args, needle):
    assert_usage_error(cli("run", model_dirs[0], *args), needle)


def test_default_model():
    """The README's main job: the built-in model ships in the package and generates, with its speeds."""
    r = cli("run", "default", "--prompt", PROMPT, "--max-new-tokens", 8, *THREADS)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip(), "no text was generated"
    assert re.search(r"^prefill +9 tokens in [0-9.]+ s: [0-9.]+ tokens/s$", r.stderr, re.M), r.stderr
    assert re.search(r"^decode +7 tokens in [0-9.]+ s: [0-9.]+ tokens/s$", r.stderr, re.M), r.stderr
    assert re.search(r"^experts +cpu:numa0 [0-9.]+ MiB", r.stderr, re.M), r.stderr


def test_dense_layers_run_where_the_user_says(model_dirs):
    """By default the dense layers run on the experts' native backend in the model's dtype; --dense-format
    picks their format or keeps transformers' own layers; each says so on stderr."""
    from moetier.backends.native import VARIANTS, is_built

    folder = model_dirs[0]
    native = any(is_built(v) for v in VARIANTS)
    outputs = {}
    for dense, needle in ((None, r"\d+ dense matrices on cpu\.\S+ in fp32" if native else r"dense layers on cpu \(torch\)"),
                          ("transformers", r"dense layers on cpu \(torch\)"),
                          ("int8", r"\d+ dense matrices on cpu\.\S+ in int8")):
        if dense == "int8" and not native:
            continue
        extra = ("--dense-format", dense) if dense else ()
        r = cli("run", folder, "--prompt", PROMPT, "--max-new-tokens", 6, "--dtype", "fp32", *THREADS, *extra)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert re.search(needle, stat_lines(r.stderr)["experts"]), r.stderr
        attention = r"attention on cpu\.[\w.]+[;,]" if native else r"attention sdpa \(transformers\)"
        assert re.search(attention, stat_lines(r.stderr)["experts"]), r.stderr
        # the default model's decoder layers (Qwen3-MoE) run fused where the kernels take every matrix
        fused = native and dense != "transformers"
        assert ("decoder layers fused for decode" in stat_lines(r.stderr)["experts"]) == fused, r.stderr
        outputs[dense] = r.stdout
    # fp32 dense layers on the kernels compute what torch's do, up to the summation order.
    assert outputs[None] == outputs["transformers"]
    # so does the attention: transformers' own, asked for by name
    r = cli("run", folder, "--prompt", PROMPT, "--max-new-tokens", 6, "--dtype", "fp32", *THREADS,
            "--attention", "sdpa")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "attention sdpa (transformers)" in stat_lines(r.stderr)["experts"], r.stderr
    assert r.stdout == outputs[None]


@pytest.mark.parametrize("args,needle", [
    (("--dense-format", "int3"), "unknown weight format 'int3'"),
    (("--dense-format", "int8", "--backend", "cpu.numba"), "no CPU backend of this model computes dense matrices"),
    (("--attention", "bogus"), "unknown attention implementation 'bogus'; known: "),
    (("--attention", "moetier", "--backend", "cpu.torch"), "attention implementation 'moetier' needs a CPU backend"),
])
def test_dense_format_errors(model_dirs, args, needle):
    assert_usage_error(cli("run", model_dirs[0], "--prompt", PROMPT, *THREADS, *args), needle)


# ---- moetier stats record --------------------------------------------------------------------------------

def test_stats_record_counts_every_routing_choice(model_dirs, tmp_path):
    import moetier
    from moetier.placement import ActivationStats
    from transformers import AutoTokenizer

    folder = model_dirs[0]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(CORPUS * 6), encoding="utf-8")
    out = tmp_path / "stats.safetensors"
    r = cli("stats", "record", folder, "--text", text, "--out", out, "--context", 40, "--dtype", "fp32", *THREADS)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "recorded" in r.stdout and str(out) in r.stdout
    stats = ActivationStats.load(out)
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    model = moetier.load(folder, dtype=torch.float32, threads=1, progress=False)
    try:
        layout = model.moetier_layout
        k = layout.moe_layers[0].experts.top_k
        assert stats.layers == layout.moe_layer_indices
        assert stats.tokens.tolist() == [len(ids)] * len(stats.layers)
        assert stats.counts.sum(dim=1).tolist() == [len(ids) * k] * len(stats.layers)
        # The same counts from the routers' choices, recorded here through the Python API.
        again = ActivationStats(layout.moe_layer_indices, stats.num_experts)
        model.moetier_experts.set_recorder(again)
        torch.set_num_threads(1)
        with torch.inference_mode():
            for start in range(0, len(ids), 40):
                model(input_ids=torch.tensor([ids[start:start + 40]]), use_cache=False)
    finally:
        model.moetier_experts.close()
    assert torch.equal(again.counts, stats.counts)
    assert (stats.counts > 0).sum() > stats.num_experts  # the routers spread the tokens: a real record


def test_stats_record_errors(model_dirs, tmp_path):
    folder = model_dirs[0]
    text = tmp_path / "t.txt"
    text.write_text("hello world", encoding="utf-8")
    assert_usage_error(cli("stats", "record", folder, "--out", tmp_path / "s"), "--text")
    assert_usage_error(cli("stats", "record", folder, "--text", tmp_path / "none.txt", "--out", tmp_path / "s"),
                       "no such file")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    assert_usage_error(cli("stats", "record", folder, "--text", tmp_path / "bin.txt", "--out", tmp_path / "s"),
                       "not UTF-8")
    assert_usage_error(cli("stats", "record", folder, "--text", text, "--out", tmp_path / "no" / "s"), "does not exist")
    assert_usage_error(cli("stats", "record", model_dirs[1], "--text", text, "--out", tmp_path / "s"), "no tokenizer")


def test_run_with_a_memory_budget_and_a_plan_file(model_dirs, tmp_path):
    """--cpu-mem/--disk make a plan here; --plan reads `moetier plan --json`; the two never mix."""
    folder = model_dirs[0]
    plan = tmp_path / "plan.json"
    r = cli("plan", folder, "--cpu-mem", "4MiB", "--disk", "--context", 256, "--json", plan)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("run", folder, "--plan", plan, "--prompt", PROMPT, "--max-new-tokens", 4, *THREADS)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cpu:numa0" in stat_lines(r.stderr)["experts"]
    assert_usage_error(cli("run", folder, "--plan", plan, "--cpu-mem", "4MiB", "--prompt", PROMPT), "--plan", "--cpu-mem")
    assert_usage_error(cli("run", folder, "--cpu-mem", "1KiB", "--prompt", PROMPT, *THREADS), "does not fit")
    assert_usage_error(cli("run", folder, "--plan", tmp_path / "none.json", "--prompt", PROMPT), "no such file")
    # --gpu-mem where there is no accelerator (a recorded 2-core machine): said at once, never a plan for a
    # GPU this run cannot use
    zen4 = Path(__file__).parent / "inventories" / "zen4_avx512_2core.json"
    assert_usage_error(cli("run", folder, "--gpu-mem", "1GiB", "--inventory", zen4, "--prompt", PROMPT, *THREADS),
                       "--gpu-mem: this machine has no accelerator", "--gpu-mem 0")
