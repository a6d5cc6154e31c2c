import dataclasses
import math

import torch

from mend.batching import encode, logits, masked_kl, target_nll, tokenize_pairs
from mend.metrics import greedy_decode, locality_reference, measure, summarize, target_scores
from mend.models import load_model
from mend.records import EditRecord


def test_greedy_exact_match_agrees_with_real_greedy_decoding(gpt2):
    model, tok = gpt2
    prompts = ["Alpha was born in", "The hometown of Beta is", "Gamma speaks"]
    p_ids, _ = tokenize_pairs(tok, prompts, ["x"] * 3)
    decoded = greedy_decode(model, tok, p_ids, [3, 3, 3])
    for ids, cont in zip(p_ids, decoded):  # against transformers' own greedy generate
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out[0, len(ids):].tolist() == cont
    # the model's own continuation is an exact match, one changed token is not
    texts = [tok.decode(c).strip() for c in decoded]
    round_trips = [(p, t) for p, t, c in zip(prompts, texts, decoded)
                   if t and tok(" " + t, add_special_tokens=False)["input_ids"] == c]
    assert round_trips, "no continuation survives decode/encode; pick other prompts"
    for acc, em in target_scores(model, tok, [p for p, _ in round_trips], [t for _, t in round_trips]):
        assert (acc, em) == (1.0, 1.0)


def test_token_accuracy_by_hand(gpt2):
    model, tok = gpt2
    prompt = "Alpha was born in"
    p_ids, _ = tokenize_pairs(tok, [prompt], ["x"])
    top = greedy_decode(model, tok, p_ids, [1])[0][0]
    wrong = (top + 1) % len(tok)
    # target = [top, wrong]: first position right, second position judged after `top`
    batch_logits = model(input_ids=torch.tensor([p_ids[0] + [top]])).logits[0, -1]
    second_top = int(batch_logits.argmax())
    target_ids = [top, wrong if wrong != second_top else (wrong + 1) % len(tok)]
    from mend.metrics import score_ids

    pred = score_ids(model, tok, p_ids, [target_ids])[0]
    assert pred.tolist() == [top, second_top]
    hits = (pred == torch.tensor(target_ids)).float()
    assert hits.mean().item() == 0.5 and not bool(hits.all())


def test_logits_at_target_positions_are_the_full_logits_there_and_scores_keep_their_order(gpt2):
    model, tok = gpt2
    prompts = ["Alpha was born in the city of", "Beta", "The hometown of Gamma is"]
    targets = ["Zorath Velin", "speaks", "x"]
    batch = encode(tok, prompts, targets)
    shifted = {k: v + 0.01 for k, v in model.named_parameters() if k.endswith("mlp.c_fc.weight")}  # an override too
    for weights in (None, shifted):
        full = logits(model, batch, weights)
        assert torch.allclose(logits(model, batch, weights, at=batch.target_mask), full[batch.target_mask], atol=1e-5)
    # batched by length inside score_ids, returned in the caller's order: the same as one pair at a time
    from mend.metrics import score_ids

    p_ids, t_ids = tokenize_pairs(tok, prompts, targets)
    together = score_ids(model, tok, p_ids, t_ids, batch_size=2)
    assert [x.tolist() for x in together] == [score_ids(model, tok, [p], [t])[0].tolist() for p, t in zip(p_ids, t_ids)]


def test_unedited_model_has_perfect_locality_and_nan_for_missing_fields(gpt2):
    model, tok = gpt2
    records = [
        EditRecord(prompt="Alpha was born in", target_new="Drelkio", rephrase_prompt=("Alpha is a native of",),
                   locality_prompt=("Beta speaks",), locality_ground_truth=("Rosish",)),
        EditRecord(prompt="Gamma plays the", target_new="harp"),
    ]
    ref = locality_reference(model, tok, records)
    m = measure(model, tok, records, None, ref)
    assert m[0].locality_tf == 1.0 and m[0].locality_em == 1.0
    assert math.isnan(m[1].generality_tf) and math.isnan(m[1].locality_em)
    s = summarize(m)
    assert s["locality_em"] == 1.0 and not math.isnan(s["reliability_tf"])


def test_losses_by_hand():
    vocab = 4
    batch = encode_stub()
    lg = torch.zeros(1, 2, vocab)  # uniform
    assert torch.allclose(target_nll(lg, batch), torch.tensor([math.log(vocab)]))
    assert masked_kl(lg, lg, torch.ones(1, 2)).item() == 0.0
    peaked = lg.clone()
    peaked[0, :, 0] = 10.0
    assert masked_kl(lg, peaked, torch.ones(1, 2)).item() > 0


def encode_stub():
    from mend.batching import TargetBatch

    return TargetBatch(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[-100, -100, 3]]))


def test_encode_marks_only_target_tokens(tokenizer):
    batch = encode(tokenizer, ["Alpha was born in", "Beta speaks"], ["Drelkio", "Rosish"])
    for row, mask in zip(batch.labels, batch.attention_mask):
        labelled = row[row != -100]
        assert len(labelled) >= 1 and (row[mask == 0] == -100).all()


def _same(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a.as_dict().values(), b.as_dict().values()))


def test_the_fast_before_and_after_agrees_with_measure_and_its_cache_with_a_fresh_reference(trained_gpt2_dir, world):
    """The server's two-pass measurement (mend.service) against the plain definitions above, on an
    edited model where some locality predictions change and some locality answers are unknown (so
    greedy continuations leave the answer and have to be decoded)."""
    from mend.metrics import LocalityCache, before_and_after

    model, tok = load_model(trained_gpt2_dir, device="cpu")
    split = world.edit_split("test")
    records = [dataclasses.replace(r, locality_prompt=(r.locality_prompt[0], split.records[i + 1].prompt),
                                   locality_ground_truth=(r.locality_ground_truth[0], "Zorath Vel")) for i, r in enumerate(split.records[:6])]
    torch.manual_seed(0)
    weights = {k: v + 0.3 * v.std() * torch.randn_like(v) for k, v in model.named_parameters() if "mlp" in k}
    expected_pre = measure(model, tok, records)
    expected_post = measure(model, tok, records, weights, locality_reference(model, tok, records))
    pre, post, following = before_and_after(model, tok, records, weights)
    assert all(map(_same, pre, expected_pre)) and all(map(_same, post, expected_post))
    assert any(m.locality_em < 1 for m in post) and any(m.locality_em > 0 for m in post)  # some locality changed, some held
    again = before_and_after(model, tok, records, weights, LocalityCache(0, before_and_after(model, tok, records, None)[2]))
    assert all(map(_same, again[1], expected_post))  # answers from the cache are the fresh ones
    fresh = locality_reference(model, tok, records, weights)
    for p, a, top1, greedy in zip(fresh.prompt_ids, fresh.answer_ids, fresh.top1, fresh.greedy):
        if (tuple(p), tuple(a)) in following:
            assert following[tuple(p), tuple(a)] == (top1, greedy)
    assert len(following) < 2 * len(records)
