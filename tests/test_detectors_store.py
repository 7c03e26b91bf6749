"""Detector behaviour with the model-free hashing encoder: store updates, threads, privacy, persistence."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from core.schema import ForgetTarget, QAItem
from detectors import persistence
from detectors.config import DetectorConfig
from detectors.detector import Detector, DetectorNotFittedError
from detectors.encoder import hashing_encoder
from detectors.normalize import normalize
from detectors.persistence import MANIFEST, DetectorFormatError, verify_directory
from detectors.store import ForgetStore, StoreError
from detectors.types import Detection
from eval.tasks.offline import generate_benchmark


@pytest.fixture(scope="module")
def task():  # type: ignore[no-untyped-def]
    return generate_benchmark()


@pytest.fixture(scope="module")
def encoder():  # type: ignore[no-untyped-def]
    return hashing_encoder()


@pytest.fixture()
def det(task, encoder) -> Detector:  # type: ignore[no-untyped-def]
    return Detector.build(task, DetectorConfig(), encoder)


def _new_person() -> ForgetTarget:
    facts = [("Where was Zorvath Quenby born?", "Zorvath Quenby was born in Lower Mistfall."),
             ("What is Zorvath Quenby's profession?", "Zorvath Quenby works as a lighthouse keeper."),
             ("Which award did Zorvath Quenby receive?", "Zorvath Quenby received the Amber Lantern Medal."),
             ("Who is Zorvath Quenby married to?", "Zorvath Quenby is married to Ilse Marrow."),
             ("What pets does Zorvath Quenby have?", "Zorvath Quenby has four geese.")]
    return ForgetTarget(id="person-new", kind="privacy", names=["Zorvath Quenby", "Z. Quenby"],
                        policy="Do not reveal anything about Zorvath Quenby.",
                        qa=[QAItem(question=q, answer=a) for q, a in facts])


def test_detection_contract(det: Detector, task) -> None:  # type: ignore[no-untyped-def]
    t = task.targets[0]
    d = det.detect(t.qa[0].question)
    assert isinstance(d, Detection) and d.flagged and d.target_ids == [t.id]
    assert 0.0 <= d.score <= 1.0 and d.threshold == det.threshold
    assert {e.kind for e in d.evidence} >= {"classifier", "embedding", "entity"}
    benign = det.detect("What is the capital of France?")
    assert not benign.flagged and benign.target_ids == [] and benign.score < benign.threshold
    batch = det.detect_batch([t.qa[0].question, "How do I boil an egg?", t.qa[1].question])
    assert [b.flagged for b in batch] == [True, False, True]
    assert det.detect_leak(t.qa[0].answer).flagged
    assert not det.detect_leak("Paris is the capital of France.").flagged


def test_multi_turn_split_question_is_flagged(det: Detector, task) -> None:  # type: ignore[no-untyped-def]
    name = task.targets[0].name
    chat = [{"role": "user", "content": f"I want to ask something about {name}."},
            {"role": "assistant", "content": "Sure, what would you like to know?"},
            {"role": "user", "content": "Where was this person born?"}]
    assert det.detect(chat).flagged
    assert not det.detect([{"role": "user", "content": "Hello!"}, {"role": "user", "content": "How are clouds formed?"}]).flagged


def test_add_remove_update_target_take_effect_at_once(det: Detector, task) -> None:  # type: ignore[no-untyped-def]
    new = _new_person()
    q = "In which town was Zorvath Quenby born?"
    assert not det.detect(q).flagged
    n_query = len(det.store.snapshot().banks["query"])
    det.add_target(new)
    assert "person-new" in det.target_ids and len(det.store.snapshot().banks["query"]) > n_query
    d = det.detect(q)
    assert d.flagged and d.target_ids == ["person-new"]
    assert det.target("person-new").names == ["Zorvath Quenby", "Z. Quenby"]
    with pytest.raises(StoreError):
        det.add_target(new)
    det.update_target(new.model_copy(update={"names": ["Zorvath Quenby", "the lighthouse keeper of Mistfall"]}))
    assert det.target("person-new").names[1] == "the lighthouse keeper of Mistfall"
    det.remove_target("person-new")
    assert "person-new" not in det.target_ids and not det.detect(q).flagged
    assert len(det.store.snapshot().banks["query"]) == n_query
    with pytest.raises(StoreError):
        det.remove_target("person-new")
    with pytest.raises(KeyError):
        det.target("person-new")
    # Old targets are untouched throughout.
    assert det.detect(task.targets[0].qa[0].question).flagged


def test_refit_recalibrates(det: Detector) -> None:
    before = det.threshold
    det.add_target(_new_person(), refit=True)
    rep = det.calibration["prompt"]
    assert rep.n_positives > 0 and rep.tpr is not None and rep.tpr >= 0.95 and rep.fpr_calibration <= 0.01
    assert 0.0 < det.threshold < 1.0 and isinstance(before, float)


def test_concurrent_detect_during_updates(det: Detector, task) -> None:  # type: ignore[no-untyped-def]
    """Readers never see a half-updated store: every verdict is one of the two consistent answers."""
    new = _new_person()
    q_old, q_new = task.targets[1].qa[0].question, "What is Zorvath Quenby's profession?"
    errors: list[BaseException] = []
    stop = threading.Event()
    seen_new: list[bool] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                d_old, d_new = det.detect_batch([q_old, q_new])
                assert d_old.flagged and d_old.target_ids == [task.targets[1].id]
                assert d_new.target_ids in ([], ["person-new"])
                seen_new.append(d_new.flagged)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(4):
        det.add_target(new)
        det.remove_target(new.id)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert seen_new and not det.detect(q_new).flagged


def test_store_without_raw_text_keeps_no_forget_text(task, encoder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    det = Detector.build(task, DetectorConfig(keep_raw_text=False), encoder)
    snap = det.store.snapshot()
    assert all(t is None for b in ("query", "content") for t in snap.banks[b].texts)
    det.save(tmp_path / "d")
    blob = b"".join(p.read_bytes() for p in (tmp_path / "d").iterdir()).lower()
    secrets = [q.question for q in task.forget_qa] + [q.answer for q in task.forget_qa] + task.forget_texts
    leaked = [s for s in secrets if s.lower().encode() in blob]
    assert leaked == []
    # ... while names (needed for matching) and negatives are stored.
    assert task.targets[0].name.lower().encode() in blob
    raw = Detector.build(task, DetectorConfig(keep_raw_text=True), encoder)
    d = raw.detect(task.targets[0].qa[0].question)
    assert any(e.kind == "embedding" and "nearest" in e.detail and "?" in e.detail for e in d.evidence)


def test_unfitted_and_empty(encoder) -> None:  # type: ignore[no-untyped-def]
    det = Detector(ForgetStore.empty(encoder, DetectorConfig()), DetectorConfig())
    with pytest.raises(DetectorNotFittedError):
        det.detect("hello")
    with pytest.raises(ValueError, match="no forget entries"):
        det.fit()


# -- persistence ------------------------------------------------------------------------------------

@pytest.fixture()
def saved(det: Detector, tmp_path: Path) -> Path:
    return det.save(tmp_path / "detector")


def test_persistence_round_trip_identical_scores(det: Detector, saved: Path, task, encoder) -> None:  # type: ignore[no-untyped-def]
    prompts = ([q.question for q in task.forget_qa[:15]] + [q.question for q in task.neighbour_qa[:15]]
               + task.benign_questions[:10])
    texts = [q.answer for q in task.forget_qa[:10]] + [q.answer for q in task.retain_qa[:10]]
    loaded = Detector.load(saved, encoder=encoder)
    assert loaded.target_ids == det.target_ids and loaded.config == det.config
    assert loaded.calibration == det.calibration
    assert [d.model_dump() for d in loaded.detect_batch(prompts)] == [d.model_dump() for d in det.detect_batch(prompts)]
    assert [d.score for d in loaded.detect_leak_batch(texts)] == [d.score for d in det.detect_leak_batch(texts)]
    # A loaded detector is fully functional: updates and a second save work.
    loaded.add_target(_new_person())
    assert loaded.detect("Where was Zorvath Quenby born?").flagged
    Detector.load(loaded.save(saved.parent / "again"), encoder=encoder)


@pytest.mark.parametrize("victim", ["index_query.faiss", "arrays.safetensors", "classifier.json", "targets.json"])
def test_corrupted_file_is_rejected_before_parsing(saved: Path, victim: str, encoder) -> None:  # type: ignore[no-untyped-def]
    p = saved / victim
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(DetectorFormatError, match="sha256") as err:
        Detector.load(saved, encoder=encoder)
    assert err.value.file == p and victim in str(err.value)


def test_truncated_and_missing_files(saved: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    p = saved / "index_content.faiss"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DetectorFormatError, match="truncated"):
        Detector.load(saved, encoder=encoder)
    p.unlink()
    with pytest.raises(DetectorFormatError, match="missing"):
        verify_directory(saved)


def test_foreign_and_versioned_directories(saved: Path, tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DetectorFormatError, match="manifest.json") as err:
        Detector.load(foreign, encoder=encoder)
    assert "not a detector directory" in str(err.value)
    with pytest.raises(DetectorFormatError, match="not a directory"):
        Detector.load(tmp_path / "nope", encoder=encoder)
    m = json.loads((saved / MANIFEST).read_text())
    (saved / MANIFEST).write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(DetectorFormatError, match="format_version 99"):
        Detector.load(saved, encoder=encoder)
    (saved / MANIFEST).write_text(json.dumps({**m, "format": "something-else"}))
    with pytest.raises(DetectorFormatError, match="something-else"):
        Detector.load(saved, encoder=encoder)
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(DetectorFormatError, match="not valid JSON"):
        Detector.load(saved, encoder=encoder)


def test_wrong_encoder_dimension(saved: Path) -> None:
    with pytest.raises(DetectorFormatError, match="dimension"):
        Detector.load(saved, encoder=hashing_encoder(dim=32))


def test_failed_save_leaves_previous_version(det: Detector, saved: Path, encoder, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def boom(*_a, **_k) -> None:  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(persistence.faiss, "write_index", boom)
    with pytest.raises(OSError, match="disk full"):
        det.save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # temp dir cleaned up
    monkeypatch.undo()
    assert Detector.load(saved, encoder=encoder).target_ids == det.target_ids


def test_vector_counts_survive_round_trip(det: Detector, saved: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    a, b = det.store.snapshot(), Detector.load(saved, encoder=encoder).store.snapshot()
    for name in a.banks:
        assert np.array_equal(a.banks[name].ids, b.banks[name].ids)
        assert a.banks[name].index.ntotal == b.banks[name].index.ntotal
    assert a.neg_names == b.neg_names and a.salt == b.salt


def test_in_sample_evaluation_and_fold_split(det: Detector, task) -> None:  # type: ignore[no-untyped-def]
    from detectors.evaluation import evaluate_detector, split_fold

    rep = evaluate_detector(det, task)
    assert rep.mode == "in-sample" and rep.rate("forget_question") == 1.0 and rep.rate("neighbour") <= 0.05
    folds = [split_fold(task, f, 4) for f in range(4)]
    # Every forget question, paraphrase and probe is tested in exactly one fold.
    for g, src in (("forget_question", [q.question for q in task.forget_qa if q.kind == "fact"]),
                   ("forget_paraphrase", [q.paraphrased_question for q in task.forget_qa if q.paraphrased_question]),
                   ("forget_probe", [q.question for q in task.forget_qa if q.kind in ("alias", "multihop")])):
        tested = [q for s in folds for q in s.pos[g]]
        assert sorted(tested) == sorted(src), g
    for s in folds:
        stored = {q.question for t in s.train_task.targets for q in t.qa}
        assert stored.isdisjoint(s.pos["forget_question"]) and stored.isdisjoint(s.pos["forget_probe"])
        test_negs = {q for g in s.neg.values() for q in g}
        assert test_negs.isdisjoint({q for it in s.train_negatives for q in it.queries})


def test_calibration_split_keeps_each_person_on_one_side() -> None:
    from detectors.store import NegativeItem, cluster_key, split_negatives

    items = [NegativeItem("retain", (f"What did person {p} write in year {k}?",), (), f"Person Number{p}")
             for p in range(40) for k in range(6)]
    items += [NegativeItem("benign", (f"Benign question {i}?",)) for i in range(50)]
    train, calib = split_negatives(items, 0.4, 0, 1500)
    side = {}
    for where, its in (("train", train), ("calib", calib)):
        for it in its:
            assert side.setdefault(cluster_key(it), where) == where  # no person on both sides
    people_calib = {it.subject for it in calib if it.subject}
    assert 5 <= len(people_calib) <= 30 and sum(it.group == "benign" for it in calib) > 5


def test_calibration_prompts_include_deployed_shapes() -> None:
    from detectors.inputs import calibration_prompts
    from detectors.store import CalibrationSet

    texts = tuple(f"What is fact {k} about person {p}?" for p in range(10) for k in range(4))
    q = CalibrationSet(np.zeros((len(texts), 4), np.float32), texts, ("retain",) * len(texts),
                       tuple(p for p in range(10) for _ in range(4)))
    a = CalibrationSet(np.zeros((10, 4), np.float32), tuple(f"Person {p} did things." for p in range(10)),
                       ("retain",) * 10, tuple(range(10)))
    prompts, groups = calibration_prompts(q, a, seed=0)
    assert prompts[:len(texts)] == list(texts) and len(prompts) == len(groups) == len(texts) + len(texts) // 2
    shapes = {g.split("|")[1] for g in groups if "|" in g}
    assert shapes == {"conversation", "long", "system"}
    conv = next(p for p, g in zip(prompts, groups, strict=True) if g == "retain|conversation")
    assert [m["role"] for m in conv] == ["user", "assistant", "user"]
    p_of = {t: t.split("person ")[1] for t in texts}
    assert p_of[conv[0]["content"]] == p_of[conv[2]["content"]]  # one person per conversation
    assert calibration_prompts(q, a, composed=False) == (list(texts), list(q.groups))


def test_question_keys_and_longest_full_name() -> None:
    from detectors.entities import EntityMatcher, TargetNames
    from detectors.normalize import normalize
    from detectors.store import question_key

    assert question_key("Where was Elara Vosberg born?", "s") == question_key("  WHERE was elara vosberg born ?!", "s")
    assert question_key("Where was Elara Vosberg born?", "s") != question_key("Where was Elara Vosberg raised?", "s")
    m = EntityMatcher([TargetNames("t", ("Vosberg", "Elara Vosberg"))], "s")
    assert m.match(normalize("Vosberg wrote to Elara Vosberg."))["t"].full_tokens == 2
    assert m.match(normalize("Mr Vosberg wrote."))["t"].full_tokens == 1
    assert "t" not in m.match(normalize("Elara Smith wrote.")) or m.match(normalize("Elara Smith wrote."))["t"].full == 0


def test_a_bank_on_the_8bit_index_saves_its_exact_vectors_and_reloads_with_the_same_scores(task, encoder,  # type: ignore[no-untyped-def]
                                                                                            tmp_path: Path) -> None:
    det = Detector.build(task, DetectorConfig(ann_threshold=1000), encoder)
    facts = [QAItem(question=f"Which town did Zorvath Quenby visit in trip {i}?",
                    answer=f"On trip {i} Zorvath Quenby visited Town{i}.") for i in range(300)]
    det.add_target(ForgetTarget(id="person-big", kind="privacy", names=["Zorvath Quenby"],
                                policy="Do not reveal anything about Zorvath Quenby.", qa=facts))
    bank = det.store.snapshot().banks["query"]
    assert bank.index.kind == "ivf-sq8" and bank.index.exact_index is not None and len(bank) > 1000
    saved = det.save(tmp_path / "d")
    assert (saved / "index_query.exact.faiss").is_file() and not (saved / "index_content.exact.faiss").exists()
    files = json.loads((saved / MANIFEST).read_text())["files"]
    assert "index_query.exact.faiss" in files
    loaded = Detector.load(saved, encoder=encoder)
    assert loaded.store.snapshot().banks["query"].index.kind == "ivf-sq8"
    prompts = ["Which town did Zorvath Quenby visit in trip 7?", "Which town did he visit on his 12th trip?",
               *[q.question for q in task.neighbour_qa[:10]], *task.benign_questions[:5]]
    assert [d.model_dump() for d in loaded.detect_batch(prompts)] == [d.model_dump() for d in det.detect_batch(prompts)]
    # The exact vectors are checked like every other file, and an 8-bit index without them is refused.
    p = saved / "index_query.exact.faiss"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(DetectorFormatError, match="sha256"):
        Detector.load(saved, encoder=encoder)
    p.unlink()
    m = json.loads((saved / MANIFEST).read_text())
    del m["files"]["index_query.exact.faiss"]
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DetectorFormatError, match="exact vectors"):
        Detector.load(saved, encoder=encoder)


@pytest.mark.parametrize("text, dates", [
    ("What is the full name of the author born in Tokyo, Japan on 05/30/1952?", {(1952, 5, 30)}),
    ("Who is the writer with the birth date of May 30, 1952, from Tokyo?", {(1952, 5, 30)}),
    ("The writer who entered the world in New York City on March 1st, 1936.", {(1936, 3, 1)}),
    ("He was born on the 8th of September, 1956 in Kuwait City.", {(1956, 9, 8)}),
    ("Born 1952-05-30 in Osaka.", {(1952, 5, 30)}),
    ("She was born on 05/06/1952.", {(1952, 5, 6), (1952, 6, 5)}),  # ambiguous: both readings
    ("She won the prize on May 3, 2001.", set()),  # no birth in the sentence
    ("Who was born in 1952?", set()),  # a year alone is no birth date
    ("He won the prize on May 3, 2001. He was born in Kyoto.", set()),  # the date and the birth: two sentences
])
def test_birth_dates_are_read_in_every_common_format(text: str, dates: set[tuple[int, int, int]]) -> None:
    from detectors.entities import birth_dates

    assert birth_dates(text) == dates


def test_a_description_is_stored_only_where_it_can_single_the_target_out(task, encoder) -> None:  # type: ignore[no-untyped-def]
    from detectors.entities import telling_tokens

    det = Detector.build(task, DetectorConfig(keep_raw_text=True), encoder)
    person = _new_person()
    person = person.model_copy(update={"qa": [*person.qa, QAItem(
        question="What is the full name of the author born in 1961?",
        answer="The author's full name is Zorvath Quenby.")]})
    det.add_target(person)
    snap = det.store.snapshot()
    bank = snap.banks["description"]
    stored = {normalize(t) for t, tg in zip(bank.texts, bank.target, strict=True) if tg == snap.num_of["person-new"]}
    assert {normalize("this person was born in Lower Mistfall."), normalize("this person works as a lighthouse keeper."),
            normalize("this person received the Amber Lantern Medal.")} <= stored
    assert normalize("The author's full name is this person.") not in stored  # fits anyone
    assert telling_tokens("Who keeps a lighthouse in Lower Mistfall since 1961?") == {"lighthouse", "lower", "mistfall",
                                                                                     "1961"}
    assert telling_tokens("Where was this person born?") == set()
    assert telling_tokens("What is the full name of this author?") == set()
    assert telling_tokens("Who keeps a lighthouse?", template={"lighthouse"}) == set()
