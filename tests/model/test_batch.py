from model.batch import SequenceData
from model.processor import PromptInputs, position_ids_for
from model.sampling_params import SamplingParams


def test_token_ids_and_positions_span_prompt_and_output():
    types = [0, 1, 1, 1, 1, 0, 0]  # BOS, boi, 2 patches, eoi, 2 text
    prompt = PromptInputs([1, 0, 0, 0, 0, 5, 6], types, position_ids_for(types))
    seq = SequenceData("r", prompt, SamplingParams(), [7, 8, 9])
    everything = prompt.input_ids + [7, 8, 9]
    positions = [0, 1, 2, 2, 3, 4, 5, 6, 7, 8]
    for start in range(len(everything) + 1):
        for end in range(start, len(everything) + 1):
            assert seq.token_ids(start, end) == everything[start:end]
            assert seq.positions(start, end) == positions[start:end]
    assert [seq.token_type(i) for i in range(9)] == types + [0, 0]
