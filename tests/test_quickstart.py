"""The README's first command, as a user runs it: `examples/quickstart.sh` serves the demo model.

The script installs nothing here (the dev extras carry the model package), writes the real Gemma 3 270M GGUF
into ~/.cache/llamesh/models once, and runs `llamesh serve` with examples/config.yaml and examples/cookbook.yaml.
Only the port and the metrics file are moved (LLAMESH_* overrides), so the test leaves the checkout clean and
can run beside a quickstart a developer left on :8080.

What it holds the README to: the demo model is the *base* Gemma 3 270M, and the prompts the README shows get
the answers the README prints ("Paris"); chat works in Gemma's turn format (the GGUF has no template of its
own); the embedding profile answers. Greedy decoding (temperature 0) keeps the answers stable.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from rig import processes

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
FEW_SHOT = (
    "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of Germany?\nA: Berlin\n"
    "Q: What is the capital of France?\nA:"
)


@pytest.fixture
async def quickstart(tmp_path: Path, llama_server_binary: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    # `llama_server_binary` builds (or finds) llama-server where examples/config.yaml's binary_path points.
    port = processes.free_port()
    env = dict(
        os.environ,
        LLAMESH_LISTEN_ADDR=f"127.0.0.1:{port}",
        LLAMESH_METRICS_PATH=str(tmp_path / "node-metrics.json"),
    )
    child = processes.start(
        ["bash", str(ROOT / "examples" / "quickstart.sh")], log_path=tmp_path / "quickstart.log", env=env
    )
    base_url = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=180)
    try:
        await processes.wait_healthy(child, base_url, deadline_s=300)  # first run: writes the 250 MB model
        yield client
    finally:
        await client.close()
        await processes.stop(child, grace_s=15)
        print(f"--- the quickstart's log ({child.log_path}), shown when the test fails:\n{child.log_tail(80)}")


async def test_quickstart_serves_the_base_model_and_the_readme_prompts_get_their_answers(
    quickstart: openai.AsyncOpenAI,
) -> None:
    client = quickstart
    listed = {model.id: model for model in (await client.models.list()).data}
    assert set(listed) == {"gemma-3-270m", "gemma-3-270m:embed"}
    described = listed["gemma-3-270m"].model_extra or {}
    assert "base" in described["metadata"]["model_description"]  # says what it is

    # The README's curl example: the few-shot prompt, stopped at the line's end.
    answer = await client.completions.create(
        model="gemma-3-270m", prompt=FEW_SHOT, max_tokens=8, temperature=0, stop=["\n"]
    )
    assert answer.choices[0].text.strip() == "Paris"

    # The README's Python example: streamed completion of a plain sentence.
    pieces = []
    async for chunk in await client.completions.create(
        model="gemma-3-270m", prompt="The Eiffel Tower is in the city of", max_tokens=8, temperature=0, stream=True
    ):
        pieces.append(chunk.choices[0].text)
    assert "".join(pieces).lstrip().startswith("Paris")

    # Chat goes through Gemma's turn format (no template in the GGUF): a 200 with text, whatever a base model says.
    chat = await client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content

    embedding = await client.embeddings.create(model="gemma-3-270m:embed", input="hello")
    assert len(embedding.data[0].embedding) == 640  # Gemma 3 270M's hidden size
