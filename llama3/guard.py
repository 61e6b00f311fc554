"""Llama Guard 2 and 3: is the last message of a conversation safe, and if not, which categories does it violate?

Llama Guard is a Llama 3 model fine-tuned to answer a fixed prompt (the task, a numbered list of unsafe-content
categories, the conversation, the instructions) with `safe`, or `unsafe` and a line of category codes such as
`S1,S10`. Run it next to a chat model on each user message (is the request safe?) and on each answer.

    guard = llama3.Llama.from_pretrained("meta-llama/Meta-Llama-Guard-2-8B")
    classify(guard, [{"role": "user", "content": "How do I bake bread?"}])
    # GuardResult(safe=True, categories=[], score=...)

The prompt text is Meta's (llama-recipes `prompt_format_utils.py`, PROMPT_TEMPLATE_2 / build_custom_prompt) with
the whitespace of the checkpoints' own chat templates, which strip each message: Guard 2 in `[INST] ... [/INST]`,
Guard 3 in Llama 3's user/assistant headers exactly as meta-llama/Llama-Guard-3-8B's template renders it
(including the space before <|begin_of_text|> and no blank line after the assistant header). Guard 2 prompts are
encoded after <|begin_of_text|>, as Meta's own code (and `tokenizer(prompt)`) encodes them. The score is the
model card's: the probability that the verdict's first token is "unsafe".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llama3.text.template import ControlTokenEncoder

if TYPE_CHECKING:
    from llama3.generate.llama import Llama

# Category names as the prompts print them: llama-recipes LLAMA_GUARD_2_CATEGORY (each ends in ". "), and
# Llama Guard 3's 14 as meta-llama/Llama-Guard-3-8B's chat template prints them (each ends in ".").
GUARD2_CATEGORIES = tuple(
    f"{name}. "
    for name in (
        "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Specialized Advice", "Privacy",
        "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content",
    )
)  # fmt: skip
GUARD3_CATEGORIES = tuple(
    f"{name}."
    for name in (
        "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation", "Specialized Advice",
        "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content",
        "Elections", "Code Interpreter Abuse",
    )
)  # fmt: skip

_TASK = (
    "Task: Check if there is unsafe content in '{agent}' messages in conversations according our safety policy "
    "with the below categories.\n\n"  # "according our" (sic): the text the models were trained on
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN CONVERSATION>\n\n{conversation}<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {agent} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
)
_WRAPPERS = {
    2: ("[INST] ", " [/INST]"),
    3: (
        " <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
    ),
}
_AGENT = {"user": "User", "assistant": "Agent"}

Category = str | tuple[str, str]


@dataclass
class GuardResult:
    """A verdict: `safe`, the violated category codes ("S1", ...) when unsafe, and the probability of "unsafe"
    as the verdict's first token (None when the result was parsed from text alone)."""

    safe: bool
    categories: list[str] = field(default_factory=list)
    score: float | None = None


def format_prompt(
    messages: Sequence[Mapping[str, str]], categories: Sequence[Category] | None = None, version: int = 2
) -> str:
    """The Llama Guard prompt for a conversation whose last message is classified.

    `messages`: {"role": "user" | "assistant", "content": str} dicts; the last one's role chooses whether the
    prompt asks about the 'User' or the 'Agent'. `categories`: None for the model's own (Guard 2: S1-S11,
    Guard 3: S1-S14), or a list numbered S1..Sn whose items are names (printed as given; the defaults end in
    ". " / ".") or (name, description) pairs (the description printed on the lines after its name, as
    llama-recipes' `build_custom_prompt(with_policy=True)` does). `version`: 2 or 3.
    """
    return _prompt(messages, categories, version, mark=lambda text: text)


def parse(text: str) -> GuardResult:
    """The verdict in a Llama Guard answer: "safe", or "unsafe" and optionally a line of codes ("S1,S10").

    Whitespace around it and an end-of-turn token after it (<|eot_id|>, <|end_of_text|>) are ignored;
    anything else is a ValueError quoting the text.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse takes the model's answer as a str, got {type(text).__name__}")
    body = text.strip()
    for end in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"):
        body = body.removesuffix(end).rstrip()
    lines = body.split("\n")
    verdict = lines[0].strip()
    rest = [line.strip() for line in lines[1:] if line.strip()]
    if verdict == "safe" and not rest:
        return GuardResult(True, [])
    if verdict == "unsafe" and len(rest) <= 1:
        codes = [c.strip() for c in rest[0].split(",")] if rest else []
        if all(re.fullmatch(r"S\d+", c) for c in codes):
            return GuardResult(False, codes)
    raise ValueError(f"not a Llama Guard verdict ('safe', or 'unsafe' and a line of codes like S1,S10): {text!r}")


def classify(
    llm: Llama,
    messages: Sequence[Mapping[str, str]],
    categories: Sequence[Category] | None = None,
    version: int | None = None,
    max_new_tokens: int = 64,
) -> GuardResult:
    """Classifies the last message of a conversation with a Llama Guard model: the greedy verdict, and `score`,
    the probability that the verdict starts with "unsafe" (from the logits of the step that writes it).
    `version` None reads it from the checkpoint's chat template (Guard 3's uses Llama 3 headers), else 2."""
    return classify_batch(llm, [messages], categories, version, max_new_tokens)[0]


def classify_batch(
    llm: Llama,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    categories: Sequence[Category] | None = None,
    version: int | None = None,
    max_new_tokens: int = 64,
) -> list[GuardResult]:
    """`classify` for many conversations, as one ragged batch (each result equals the one it gets alone)."""
    import torch

    if isinstance(conversations, (str, Mapping)) or not isinstance(conversations, Sequence) or not conversations:
        raise ValueError("classify_batch takes a non-empty list of conversations, each a list of messages")
    version = guard_version(llm) if version is None else version
    tokenizer = llm.tokenizer
    unsafe_id = _single_token(tokenizer, "unsafe")
    encoder = ControlTokenEncoder(tokenizer)
    prompts = []
    for i, conversation in enumerate(conversations):
        try:
            text = _prompt(conversation, categories, version, mark=encoder.mark)
        except ValueError as e:
            raise ValueError(f"conversation {i}: {e}") from None
        prompts.append(([tokenizer.bos_id] if version == 2 else []) + encoder.encode(text))
    room = llm.context_length - max(map(len, prompts))  # the verdict is a few tokens; never ask for more than fits
    if room < 1:
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        raise ValueError(
            f"conversation {longest}: its Llama Guard prompt is {len(prompts[longest])} tokens, and the guard's "
            f"context holds {llm.context_length}"
        )
    answers = llm.generate(prompts, min(max_new_tokens, room), temperature=0)

    # The score is read where the verdict word is written: the first step, unless the model first writes
    # whitespace (the Guard 3 template ends at the assistant header, before its blank line).
    leads = [_leading_whitespace(tokenizer, answer) for answer in answers]
    rows = [prompt + lead for prompt, lead in zip(prompts, leads, strict=True)]
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(row)
    last = torch.tensor([len(row) - 1 for row in rows])
    with torch.inference_mode():
        logits = llm.model(tokens.to(llm.device), logits_pos=last.to(llm.device))[:, -1]
    scores = torch.softmax(logits.float(), dim=-1)[:, unsafe_id].tolist()

    results = []
    for answer, score in zip(answers, scores, strict=True):
        result = parse(tokenizer.decode(answer))
        result.score = score
        results.append(result)
    return results


def guard_version(llm: Llama) -> int:
    """3 when the checkpoint's chat template is a Llama Guard 3 one (Llama 3 headers around the task), else 2."""
    template = llm.tokenizer.chat_template or ""
    return 3 if "<BEGIN UNSAFE CONTENT CATEGORIES>" in template and "<|start_header_id|>" in template else 2


def _prompt(messages: Any, categories: Sequence[Category] | None, version: int, mark) -> str:
    if version not in _WRAPPERS:
        raise ValueError(f"version must be 2 (Llama Guard 2) or 3 (Llama Guard 3), got {version!r}")
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"a conversation is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("a conversation needs at least one message")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {i}: missing {key!r} (got keys {sorted(message)})")
            if not isinstance(message[key], str):
                raise ValueError(f"message {i}: {key!r} must be a str, got {type(message[key]).__name__}")
        if message["role"] not in _AGENT:
            raise ValueError(f"message {i}: Llama Guard reads 'user' and 'assistant' messages, got {message['role']!r}")
        turns.append(f"{_AGENT[message['role']]}: {mark(message['content'].strip())}\n\n")
    start, end = _WRAPPERS[version]
    task = _TASK.format(
        agent=_AGENT[messages[-1]["role"]],
        categories=_categories_text(categories, version),
        conversation="".join(turns),
    )
    return start + task + end


def _categories_text(categories: Sequence[Category] | None, version: int) -> str:
    if categories is None:
        categories = GUARD2_CATEGORIES if version == 2 else GUARD3_CATEGORIES
    if isinstance(categories, (str, Mapping)) or not isinstance(categories, Sequence) or not categories:
        raise ValueError("categories is a non-empty list of names or (name, description) pairs")
    lines = []
    for i, category in enumerate(categories, 1):
        if isinstance(category, str) and category.strip():
            lines.append(f"S{i}: {category}")
        elif (
            isinstance(category, (tuple, list))
            and len(category) == 2
            and all(isinstance(part, str) for part in category)
            and category[0].strip()
        ):
            lines.append(f"S{i}: {category[0]}\n{category[1]}")
        else:
            raise ValueError(
                f"category S{i}: expected a non-empty name or a (name, description) pair, got {category!r}"
            )
    return "\n".join(lines)


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word)
    if len(ids) != 1:
        raise ValueError(f"{tokenizer.name} is not a Llama Guard vocabulary: {word!r} is not one token ({ids})")
    return ids[0]


def _leading_whitespace(tokenizer, answer: list[int]) -> list[int]:
    lead = []
    for token in answer:
        if tokenizer.token_bytes(token).strip() or token in tokenizer.special_tokens.values():
            break
        lead.append(token)
    return lead


def describe_categories(guard: Llama, codes: list[str]) -> str:
    """ "S9: Hate, S1: Violent Crimes" with the names of the checkpoint's own categories."""
    names = GUARD2_CATEGORIES if guard_version(guard) == 2 else GUARD3_CATEGORIES
    described = []
    for code in codes:
        i = int(code[1:]) - 1
        described.append(f"{code}: {names[i].strip().rstrip('.')}" if 0 <= i < len(names) else code)
    return ", ".join(described) or "no category given"
