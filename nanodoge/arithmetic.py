"""
The arithmetic curriculum: the offline post-training data (SFT, DPO, GRPO) of `python prepare_data.py`.

Word problems in + and - (and * by one digit), operands of up to a few digits, each with a worked solution that
goes column by column, right to left, as a pupil writes it, and for DPO a plausible wrong one (a carry or borrow
dropped, else a column off by one) that is consistent with its wrong answer. Held-out splits (test, sft_val,
dpo_val) are unique and disjoint from every training split, in either operand order. prepare_data.py renders
these examples with the chat template and writes them.
"""
import re
import random

from nanodoge import tokenizer as tk


SPLIT_SIZES = {"test": 500, "sft_val": 200, "dpo_val": 100,  # held out: unique, disjoint from all training
               "sft_train": 5000, "dpo_train": 1500, "grpo_train": 4000}  # GRPO: a fresh prompt a rollout
NAMES = ["Ann", "Ben", "Maya", "Leo", "Sara", "Omar", "Lily", "Tom"]
ITEMS = ["apples", "books", "coins", "marbles", "stickers", "pencils", "shells", "cards"]
TEMPLATES = {
    "+": ["What is {a} + {b}?", "Add {a} and {b}.",
          "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
          "A shop sold {a} {item} on Monday and {b} on Tuesday. How many {item} did it sell in total?"],
    "-": ["What is {a} - {b}?", "Subtract {b} from {a}.",
          "{name} has {a} {item} and gives away {b}. How many {item} are left?",
          "A shop had {a} {item} and sold {b}. How many {item} does it have now?"],
    "*": ["What is {a} * {b}?", "Multiply {a} by {b}.",
          "{name} buys {b} bags with {a} {item} in each bag. How many {item} is that?",
          "There are {b} rows of {a} {item}. How many {item} are there?"],
}


def random_problem(rng, digits, ops):
    """(op, a, b), op one of ops: operands of 1 to `digits` digits, more of them long than short; multiplication
    by a single digit."""
    op = rng.choice(ops)
    lengths = range(1, digits + 1)

    def number():
        n = rng.choices(lengths, weights=lengths)[0]
        return rng.randint(10 ** (n - 1) if n > 1 else 1, 10 ** n - 1)

    if op == "*":
        return op, number(), rng.randint(2, 9)
    a, b = number(), number()
    if op == "-" and a < b:
        a, b = b, a  # answers stay non-negative
    return op, a, b


def problem_key(problem):
    """Problems that are the same question: 3 + 5 and 5 + 3 count as one (for the train/test split)."""
    op, a, b = problem
    return (op, min(a, b), max(a, b)) if op in "+*" else problem


def columns(problem):
    op, a, b = problem
    return len(str(a)) if op == "*" else max(len(str(a)), len(str(b)))


def worked_solution(problem, mistake=None):
    """(steps, answer): column-by-column working, right to left, as a pupil writes it. mistake = ("drop", i)
    forgets the carry (or borrow) out of column i; ("slip", i, d) gets column i's result wrong by d. Later
    steps follow from the mistake, so a wrong solution is consistent with its wrong answer."""
    op, a, b = problem
    top, bottom = [int(c) for c in str(a)[::-1]], [int(c) for c in str(b)[::-1]]
    # the sum restated first: each column's digits are then a short, fixed distance back
    lines, written, carry = [f"{a}{op}{b}"], [], 0
    for i in range(columns(problem)):
        x, y = top[i] if i < len(top) else 0, bottom[i] if i < len(bottom) else 0
        slip = mistake[2] if mistake and mistake[:2] == ("slip", i) else 0
        if op == "+":
            value = x + y + carry + slip
            expr, digit, carry = f"{x}+{y}" + (f"+{carry}" if carry else ""), value % 10, value // 10
        elif op == "-":  # borrow 10 from the next column when the top digit is too small
            borrow = int(x - y - carry < 0)
            value = x + 10 * borrow - y - carry + slip
            expr, digit, carry = f"{x + 10 * borrow}-{y}" + ("-1" if carry else ""), value, borrow
        else:
            value = x * b + carry + slip
            expr, digit, carry = f"{x}*{b}" + (f"+{carry}" if carry else ""), value % 10, value // 10
        if value < 0 or digit > 9:
            raise ValueError(f"slip {slip} makes column {i} of {a}{op}{b} impossible")
        if mistake == ("drop", i):
            carry = 0
        word = "borrow" if op == "-" else "carry"
        lines.append(f"{expr}={value}, write {digit}" + (f", {word} {carry}" if carry else ""))
        written.append(digit)
    if carry and op != "-":
        lines.append(f"write {carry}")
        written.append(carry)
    answer = int("".join(map(str, written[::-1])))
    lines.append(f"{a}{op}{b}={answer}")
    return "\n".join(lines), answer


def wrong_solution(problem, rng):
    """A plausible wrong worked solution: a dropped carry or borrow where the problem has one, else a column off
    by one. A dropped carry breaks a rule that holds in every problem, which DPO learns from a few hundred pairs;
    a column off by one is one wrong fact (7*8=57), and preferring the right fact in one problem says little about
    another fact in the next, and DPO's held-out preference on such pairs barely moved (README: figures)."""
    steps, answer = worked_solution(problem)
    column_lines = steps.split("\n")[1:1 + columns(problem)]
    mistakes = [("drop", i) for i, line in enumerate(column_lines) if "carry" in line or "borrow" in line]
    mistakes += [("slip", i, d) for i in range(len(column_lines)) for d in (-1, 1)]
    rng.shuffle(mistakes)
    mistakes.sort(key=lambda mistake: mistake[0] != "drop")  # stable: a random drop first, if there is one
    for mistake in mistakes:
        try:
            wrong_steps, wrong_answer = worked_solution(problem, mistake)
        except ValueError:  # a slip below zero (or past 9 in subtraction): not a plausible mistake
            continue
        if wrong_answer != answer:
            return wrong_steps, wrong_answer
    raise AssertionError(f"no plausible mistake for {problem}")


def line_rewards(completion, reference):
    """The process reward of a completion (GRPO's advantage="process"): [(end, reward)] per step, end the
    character offset where the step ends, reward 1.0 if the step is right else 0.0. The steps are the lines of
    <think>, then the answer. The first line restates the problem ("27+58"): right when its value is the
    reference. Each later line is right when it is the line worked_solution writes there for the restated
    problem, so a column is judged on what the completion set out to compute. The answer is right when it is the
    reference. A completion that is not <think>...</think><answer>...</answer> is one wrong step."""
    match = re.fullmatch(r"\s*<think>(.+?)</think>\s*<answer>([^<]+)</answer>\s*", completion, re.DOTALL)
    if match is None:
        return [(len(completion), 0.0)]
    reference = tk.normalize_answer(str(reference))
    lines = match.group(1).split("\n")
    restated, working, restated_right = re.fullmatch(r"(\d+)([+*-])(\d+)", lines[0]), [], False
    if restated:
        a, op, b = int(restated[1]), restated[2], int(restated[3])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        restated_right = str(value) == reference
        if value >= 0 and (op != "*" or b < 10):  # the problems worked_solution writes out
            working = worked_solution((op, a, b))[0].split("\n")
    steps, end = [], match.start(1)
    for k, line in enumerate(lines):
        end += len(line) + (k < len(lines) - 1)  # a line ends with its newline; the last one before </think>
        right = restated_right if k == 0 else k < len(working) and line == working[k]
        steps.append((end, float(right)))
    return steps + [(len(completion), float(tk.normalize_answer(match.group(2)) == reference))]


def format_solution(steps, answer):
    return f"<think>{steps}</think><answer>{answer}</answer>"


def question(problem, rng):
    op, a, b = problem
    return rng.choice(TEMPLATES[op]).format(a=a, b=b, name=rng.choice(NAMES), item=rng.choice(ITEMS))


def arithmetic_problems(seed, digits, ops):
    """{split: [(op, a, b), ...]}: held-out splits first, unique and mutually disjoint; training splits
    never contain a held-out problem (in either operand order)."""
    rng = random.Random(seed)
    held_out, splits = set(), {}
    for split, size in SPLIT_SIZES.items():
        seen, problems, misses = set(held_out), [], 0
        while len(problems) < size:
            problem = random_problem(rng, digits, ops)
            if problem_key(problem) not in seen:
                seen.add(problem_key(problem))
                problems.append(problem)
                misses = 0
            elif (misses := misses + 1) > 100_000:  # the space is used up: say so instead of looping forever
                raise ValueError(f"--arithmetic_digits={digits} --arithmetic_ops={ops} has too few distinct problems "
                                 f"for the {split} split ({size}): use more digits or operations")
        if split in ("test", "sft_val", "dpo_val"):
            held_out |= {problem_key(p) for p in problems}
        splits[split] = problems
    return splits


def arithmetic_sets(seed, digits, ops):
    """The curriculum as {set name: [example]} in the shapes the post-training sources produce:
    sft -> messages, dpo -> (prompt messages, chosen, rejected), grpo/test -> {"messages", "answer"}."""
    rng = random.Random(seed + 1)
    system = {"role": "system", "content": tk.SYSTEM_PROMPT}
    prompt = lambda p: [system, {"role": "user", "content": question(p, rng)}]
    correct = lambda p: format_solution(*worked_solution(p))
    problems = arithmetic_problems(seed, digits, ops)
    sets = {}
    for split in ("sft_train", "sft_val"):
        sets[split] = [prompt(p) + [{"role": "assistant", "content": correct(p)}] for p in problems[split]]
    for split in ("dpo_train", "dpo_val"):
        sets[split] = [(prompt(p), correct(p), format_solution(*wrong_solution(p, rng))) for p in problems[split]]
    for split in ("test", "grpo_train"):  # test phrased first: its questions do not change with grpo_train's size
        sets[split] = [{"messages": prompt(p), "answer": str(worked_solution(p)[1])} for p in problems[split]]
    return sets
