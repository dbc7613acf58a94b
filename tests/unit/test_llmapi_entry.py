"""The gateway's translation of an OpenAI request into the LLM-API model's inputs (pure)."""

from __future__ import annotations

import pytest

from pipeline.deploy.openai.llmapi_entry import llmapi_values
from pipeline.deploy.openai.protocol import ChatRequest, Unsupported

UPSTREAM = frozenset(
    ["text_input", "streaming", "sampling_param_max_tokens", "sampling_param_temperature", "sampling_param_top_p",
     "sampling_param_top_k", "sampling_param_presence_penalty", "sampling_param_frequency_penalty",
     "sampling_param_stop", "sampling_param_seed", "return_finish_reason"]
)  # fmt: skip
WITH_GUIDES = UPSTREAM | {"guided_decoding_guide_type", "guided_decoding_guide"}


def _values(**body: object) -> dict[str, object]:
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})
    return request.triton_values(16, {})


def test_sampling_fields_take_the_llmapi_names_and_stops_go_to_the_model() -> None:
    inputs = llmapi_values(_values(temperature=0.5, top_k=3, max_tokens=9), ["\n"], UPSTREAM, decoupled=True)
    assert inputs["sampling_param_temperature"] == 0.5 and inputs["sampling_param_top_k"] == 3
    assert inputs["sampling_param_max_tokens"] == 9 and inputs["sampling_param_stop"] == ["\n"]
    assert inputs["streaming"] is True and inputs["return_finish_reason"] is True
    assert not {"messages", "text_input", "seed", "stream"} & set(inputs)  # answered by the gateway itself


@pytest.mark.parametrize(
    ("body", "needle"),
    [({"logprobs": True}, "logprobs"), ({"ignore_eos": True}, "ignore_eos"),
     ({"response_format": {"type": "json_object"}}, "guided decoding")],
)  # fmt: skip
def test_what_upstreams_model_has_no_input_for_is_refused_by_name(body: dict[str, object], needle: str) -> None:
    with pytest.raises(Unsupported, match=needle):
        llmapi_values(_values(**body), [], UPSTREAM, decoupled=True)


def test_a_model_that_declares_the_guide_inputs_gets_the_schema() -> None:
    inputs = llmapi_values(_values(response_format={"type": "json_object"}), [], WITH_GUIDES, decoupled=False)
    assert inputs["guided_decoding_guide_type"] == "json" and inputs["streaming"] is False
