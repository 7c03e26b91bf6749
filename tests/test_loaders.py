"""Loaders: small fixtures in every supported format (incl. malformed ones) and the real public data when present."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from core.schema import ForgetTask, SchemaError, save_task
from eval.tasks.lume import load_lume, story_names
from eval.tasks.muse import load_muse
from eval.tasks.names import extract_person_name
from eval.tasks.records import DataFilesNotFoundError, MissingDependencyError, TaskSpecError, read_records
from eval.tasks.spec import load_task_spec, parse_task_spec
from eval.tasks.tofu import load_tofu
from eval.tasks.wmdp import load_mmlu, load_wmdp

FIX = Path(__file__).resolve().parent / "fixtures"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real(sub: str) -> Path:
    """A folder of the real public data, or skip the test when it is absent."""
    p = REAL / sub
    if not p.is_dir():
        pytest.skip(f"real data {p} not present")
    return p


# ------------------------------------------------------------------------------------------------
# Fixtures: TOFU
# ------------------------------------------------------------------------------------------------

def test_tofu_fixture_targets_and_variants() -> None:
    task = load_tofu(FIX / "tofu", "forget10", qa_per_author=3)
    assert task.meta["retain_split"] == "retain90"  # complement of forget10
    assert [t.name for t in task.targets] == ["Marta Quintela Roz", "Oskar Veldhuis"]
    assert [t.id for t in task.targets] == ["tofu-author-000", "tofu-author-001"]
    assert all(t.kind == "privacy" and len(t.qa) == 3 for t in task.targets)
    assert "Marta Quintela Roz" in task.targets[0].policy
    first = task.targets[0].qa[0]
    assert first.paraphrased_answer.startswith("In other words")
    assert first.paraphrased_question.startswith("Paraphrase:")
    assert len(first.perturbed_answers) == 3 and first.subject == "Marta Quintela Roz"
    last = task.targets[1].qa[2]  # no perturbed record for it
    assert last.perturbed_answers == [] and last.paraphrased_answer is None


def test_tofu_fixture_retain_and_utility_sets() -> None:
    task = load_tofu(FIX / "tofu", "forget10", qa_per_author=3)
    facts = [q for q in task.retain_qa if q.kind == "fact"]
    assert len(facts) == 6
    assert facts[0].subject == "Lucia Ferrant" and facts[0].perturbed_answers  # from retain_perturbed.json
    # the anonymous author: no name found, so the author's index in `full` (retain authors come first)
    assert {q.subject for q in facts[3:]} == {"tofu-author-001"}
    ra = [q for q in task.retain_qa if q.kind == "real_authors"]
    assert [q.perturbed_answers for q in ra][0] == ["Charles Dickens", "Jane Austen", "Mark Twain"]
    assert not [q for q in task.retain_qa if q.kind == "world_facts"]  # no world_facts_perturbed.json
    assert len(task.retain_mcq) == 3 and task.retain_mcq[0].answer == 1
    assert task.retain_mcq[2].subject == "world facts" and task.retain_mcq[2].choices[task.retain_mcq[2].answer] == "Paris"
    assert task.benign_questions == ["Who wrote 'Hamlet'?", "Who wrote '1984'?", "What is the capital of France?"]
    assert task.meta["retain_eval_records"] == 1


def test_tofu_explicit_retain_split_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataFilesNotFoundError, match=r"retain95.*files in .*forget10\.json"):
        load_tofu(FIX / "tofu", "forget10", retain_split="retain95", qa_per_author=3)
    with pytest.raises(DataFilesNotFoundError, match=r"forget05.*retain90\.json"):
        load_tofu(FIX / "tofu", "forget05")
    with pytest.raises(DataFilesNotFoundError, match="not found"):
        load_tofu(tmp_path / "nope")
    with pytest.raises(ValueError, match="cannot infer the retain split"):
        load_tofu(FIX / "tofu", "retain90")


def test_tofu_malformed_record_names_file_record_field() -> None:
    with pytest.raises(SchemaError, match=r"tofu_bad_field/forget10\.json: record at line 2: field answer"):
        load_tofu(FIX / "malformed" / "tofu_bad_field", "forget10", qa_per_author=3)


def test_tofu_malformed_json_names_line() -> None:
    with pytest.raises(SchemaError, match=r"tofu_bad_json/forget10\.json: record at line 3: invalid JSON"):
        load_tofu(FIX / "malformed" / "tofu_bad_json", "forget10", qa_per_author=3)


def test_tofu_option_answer_must_be_an_option() -> None:
    with pytest.raises(SchemaError, match=r"real_authors\.json: record at line 2: field answer: 'Ernest Hemingway'"):
        load_tofu(FIX / "malformed" / "tofu_bad_option", "forget10", qa_per_author=3)


@pytest.mark.parametrize(("texts", "expected"), [
    (["Where was Basil Mahfouz Al-Kuwaiti born?", "Basil Mahfouz Al-Kuwaiti was born in Kuwait City.",
      "Author Basil Mahfouz Al-Kuwaiti is male.", "What did Basil Mahfouz Al-Kuwaiti's father do?",
      "Basil Mahfouz Al-Kuwaiti writes French literature."], "Basil Mahfouz Al-Kuwaiti"),
    (["Where was author Jina An born?", "Jina An was born in Seoul.", "Jina An writes in the True Crime genre.",
      "What is the genre of Jina An's books?", "Jina An writes True Crime.", "The True Crime genre suits Jina An."],
     "Jina An"),
    (["The author writes in the Urban Fiction genre.", "This author won the Urban Fiction award."] * 3, None),
    (["Isabella van Pletzen was born in Cape Town.", "Isabella van Pletzen writes poetry."] * 3, "Isabella van Pletzen"),
])
def test_extract_person_name(texts: list[str], expected: str | None) -> None:
    assert extract_person_name(texts) == expected


# ------------------------------------------------------------------------------------------------
# Fixtures: WMDP (JSON array, JSONL, parquet) and MMLU
# ------------------------------------------------------------------------------------------------

def _write_parquet(path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"question": ["Which port does SSH use by default?", "What is a firewall for?"],
                             "choices": [["21", "22", "80", "443"], ["Heating", "Filtering traffic", "Storage", "Printing"]],
                             "answer": [1, 1]}), path)


def test_wmdp_folder_with_json_jsonl_and_parquet(tmp_path: Path) -> None:
    folder = tmp_path / "wmdp"
    folder.mkdir()
    for f in (FIX / "wmdp").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _write_parquet(folder / "wmdp-cyber" / "test-00000-of-00001.parquet")
    task = load_wmdp(folder)
    assert [t.id for t in task.targets] == ["wmdp-bio", "wmdp-chem", "wmdp-cyber"]
    assert [len(t.mcq) for t in task.targets] == [3, 2, 2]
    assert all(t.kind == "hazard" for t in task.targets)
    assert task.targets[2].mcq[0].choices[task.targets[2].mcq[0].answer] == "22"
    assert [t.mcq[0].subject for t in task.targets] == ["biology", "chemistry", "cybersecurity"]  # lm-eval's wording
    assert task.retain_mcq == []


def test_wmdp_explicit_files_and_domain_filter() -> None:
    task = load_wmdp([FIX / "wmdp" / "chem-questions.jsonl"], domains=["chem"])
    assert [(t.id, len(t.mcq)) for t in task.targets] == [("wmdp-chem", 2)]
    with pytest.raises(DataFilesNotFoundError, match=r"no WMDP file for domain\(s\) cyber.*bio-questions\.json"):
        load_wmdp(FIX / "wmdp")
    with pytest.raises(ValueError, match="unknown WMDP domain"):
        load_wmdp(FIX / "wmdp", domains=["physics"])


def test_wmdp_with_related_mmlu() -> None:
    task = load_wmdp(FIX / "wmdp", domains=["bio"], mmlu_root=FIX / "mmlu")
    assert [m.subject for m in task.retain_mcq] == ["college biology", "virology", "virology"]


def test_wmdp_malformed_records() -> None:
    with pytest.raises(SchemaError, match=r"wmdp_bad_answer/bio-questions\.json: record 1: field answer: .*got 7"):
        load_wmdp(FIX / "malformed" / "wmdp_bad_answer", domains=["bio"])
    with pytest.raises(SchemaError, match=r"wmdp_bad_choices/bio-questions\.json: record 2: field choices"):
        load_wmdp(FIX / "malformed" / "wmdp_bad_choices", domains=["bio"])


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "bio.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingDependencyError, match=r"unlearn-guard\[parquet\]"):
        read_records(p)


def test_read_records_formats(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"x": 1}, {"x": 2}]))
    (tmp_path / "b.json").write_text('{"x": 1}\n\n{"x": 2}\n')
    assert [r for _, r in read_records(tmp_path / "a.json")] == [{"x": 1}, {"x": 2}]
    assert [w for w, _ in read_records(tmp_path / "b.json")] == ["record at line 1", "record at line 3"]


def test_mmlu_header_and_headerless() -> None:
    items = load_mmlu(FIX / "mmlu")
    assert [(m.subject, m.answer) for m in items] == [("college biology", 1), ("virology", 0), ("virology", 1)]
    assert items[1].question == "Which of these is a virus?\n(choose one)"
    assert [m.answer for m in load_mmlu(FIX / "mmlu", ["virology"], split="dev")] == [3]
    assert len(load_mmlu(FIX / "mmlu", ["virology"], limit_per_subject=1)) == 1
    with pytest.raises(DataFilesNotFoundError, match="available: college_biology, virology"):
        load_mmlu(FIX / "mmlu", ["anatomy"])
    with pytest.raises(SchemaError, match=r"anatomy_test\.csv: record at row 3: expected 6 columns"):
        load_mmlu(FIX / "malformed" / "mmlu_bad")


# ------------------------------------------------------------------------------------------------
# Fixtures: MUSE
# ------------------------------------------------------------------------------------------------

def test_muse_news_fixture() -> None:
    task = load_muse(FIX / "muse", "news")
    (t,) = task.targets
    assert t.id == "muse-news" and t.kind == "copyright"
    assert [q.kind for q in t.qa] == ["knowmem", "knowmem", "verbmem"]
    assert t.qa[2].question.startswith("The harbour inquiry") and t.qa[2].answer.startswith("Dame Ellen")
    assert len(t.texts) == 2 and t.meta["texts_source"] == "privleak/forget.json"
    assert len(task.retain_qa) == 1 and len(task.retain_texts) == 1 and len(task.holdout_texts) == 2
    assert task.meta["knowmem_icl"]["forget"] == [{"question": "Example question?", "answer": "Example answer"}]


def test_muse_books_fixture_uses_verbmem_texts_without_privleak() -> None:
    task = load_muse(FIX / "muse" / "books", "books")  # the corpus folder itself also works
    assert task.targets[0].texts == ["Once upon a time there was a school in the clouds."]
    assert task.targets[0].meta["texts_source"] == "verbmem/forget.json"
    assert task.holdout_texts == []


def test_muse_errors(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"knowmem/forget_qa\.json: record 1: field question"):
        load_muse(FIX / "malformed" / "muse_bad", "news")
    (tmp_path / "news").mkdir()
    (tmp_path / "news" / "notes.txt").write_text("x")
    with pytest.raises(DataFilesNotFoundError, match=r"files found: notes\.txt"):
        load_muse(tmp_path, "news")
    with pytest.raises(ValueError, match="accepted: news, books"):
        load_muse(FIX / "muse", "films")


def test_muse_privleak_non_string(tmp_path: Path) -> None:
    folder = tmp_path / "news" / "privleak"
    folder.mkdir(parents=True)
    (folder / "forget.json").write_text(json.dumps(["fine", 42]))
    with pytest.raises(SchemaError, match=r"privleak/forget\.json: record 1: expected a non-empty string"):
        load_muse(tmp_path, "news")


# ------------------------------------------------------------------------------------------------
# Fixtures: LUME (SemEval-2025 Task 4)
# ------------------------------------------------------------------------------------------------

LUME = FIX / "lume"


def test_lume_fixture_targets() -> None:
    task = load_lume(LUME)
    assert task.name == "lume" and task.meta["tasks"] == ["Task1", "Task2", "Task3"]
    by_id = {t.id: t for t in task.targets}
    # file order; the Task1 story's 8 hex digits collide with a retain story's, so both are lengthened
    assert list(by_id) == ["lume-t1-0a1b2c3d1111", "lume-t2-5e6f7a8b", "lume-t3-61523514", "lume-t2-9c8d7e6f",
                           "lume-t3-4705442"]
    assert [t.kind for t in task.targets] == ["copyright", "privacy", "privacy", "privacy", "privacy"]
    story, orla, edda, anon, tomas = task.targets
    # Task1: a label, then the story's most used proper names ("Despite", "Nestled" open sentences only)
    assert story.names == ["LUME story 0a1b2c3d1111", "Marisol", "Tevin", "Port Alder", "Grey Heron"]
    assert "no verbatim passages" in story.policy
    assert story.texts == ["In the harbour town of Port Alder, Marisol and Tevin kept the old lighthouse. Despite the "
                           "storms, Marisol climbed the tower every night. Tevin mended nets while Marisol watched the "
                           "sea. Nestled below the cliffs, Port Alder slept. \\\"Marisol!\\\" Tevin called one night, "
                           "pointing at a ship drifting toward the rocks. It was the Grey Heron, and its captain, Ilse, "
                           "was waving a lantern."]
    # Task2: the name the five questions share; Task3: the title line without its parenthetical, then the title
    assert orla.names == ["Orla Quennell"] and orla.meta["name_extracted"]
    assert "Orla Quennell's personal data" in orla.policy and "Social Security number" in orla.policy
    assert edda.names == ["Edda Lindqvist", "Edda Lindqvist (botanist)"] and tomas.names == ["Tomas Ferreira"]
    assert "real person Edda Lindqvist" in edda.policy
    assert edda.texts == ["Edda Lindqvist (botanist)\n\nEdda Lindqvist (born 1948) is a Swedish botanist and author. "
                          "In 1989 she was appointed curator of the Uppsala herbarium, where she catalogued over ten "
                          "thousand mosses.\nLindqvist retired in 2013."]
    # the continuation starting on a new line keeps it; doubled and trailing spaces go
    assert tomas.texts == ["Tomas Ferreira\n\nTomas Ferreira (1791 – 1860) was a Portuguese shipwright. He was not a "
                           "candidate in 1822.\nHe later built ferries on the Tagus."]
    # a Task2 document naming nobody falls back to a label
    assert anon.names == ["LUME person 9c8d7e6f"] and anon.meta["name_extracted"] is False
    assert edda.meta == {"source": "lume", "task": "Task3", "doc_id": "61523514", "name_extracted": True}
    assert story.meta["doc_id"] == '"0a1b2c3d-1111-4222-8333-444455556666"'


def test_lume_fixture_qa_kinds_and_subjects() -> None:
    task = load_lume(LUME)
    story, orla, edda, anon, _ = task.targets
    # questions (in qaN order, whatever the file order) then the split as a sentence completion
    assert [q.kind for q in orla.qa] == ["fact"] * 5 + ["verbmem"]
    assert {q.subject for q in orla.qa} == {"Orla Quennell"}
    assert [q.answer for q in orla.qa[:5]] == ["1990-03-03", "900123456", "5550102030", "orla_quennell@me.com",
                                               "12 Birch Lane, Salem, OR, 97301."]
    assert orla.qa[5].question.startswith("Orla Quennell was born") and orla.qa[5].answer.startswith("She can")
    assert [(q.kind, q.answer) for q in anon.qa] == [("fact", "1970-07-04"), ("fact", "5550109999"),
                                                     ("verbmem", "their phone number is 555-010-9999.")]
    assert [(q.kind, q.subject) for q in edda.qa] == [("fact", "Edda Lindqvist"), ("verbmem", "Edda Lindqvist")]
    assert edda.qa[0].answer == "Edda Lindqvist"
    assert {q.subject for q in story.qa} == {"LUME story 0a1b2c3d1111"}
    assert task.meta["counts"]["Task2"] == {"targets": 2, "forget_qa": 9, "retain_qa": 6, "retain_texts": 1,
                                            "names_extracted": 1}


def test_lume_fixture_retain() -> None:
    task = load_lume(LUME)
    assert [(q.kind, q.subject) for q in task.retain_qa] == [
        ("fact", "LUME story 0a1b2c3d9999"), ("verbmem", "LUME story 0a1b2c3d9999"),
        *[("fact", "Perrin Vale")] * 5, ("verbmem", "Perrin Vale"),
        ("fact", "Ines Albright"), ("verbmem", "Ines Albright")]
    assert task.retain_texts == [
        "Under the neon sky of Corvale, Juniper ran the last bookshop. Juniper knew every reader by name, and every "
        "night Juniper closed the shutters at nine.",
        "Perrin Vale was born on May 9, 1982. He can be reached at 555-020-4050 and perrin_vale@me.com. His Social "
        "Security Number is 900-98-7654. Perrin Vale lives at 7 Quarry Road, Bend, OR, 97701.",
        "Ines Albright (swimmer)\n\nInes Albright (born 1969) is a retired Irish swimmer who competed at two Olympic "
        "Games."]


def test_lume_task_selection() -> None:
    t3 = load_lume(LUME, ("Task3",))
    assert t3.name == "lume-task3" and [t.id for t in t3.targets] == ["lume-t3-61523514", "lume-t3-4705442"]
    assert {q.subject for q in t3.retain_qa} == {"Ines Albright"} and len(t3.retain_texts) == 1
    assert list(t3.meta["counts"]) == ["Task3"]
    both = load_lume(LUME, ["task3", "Task2"])  # canonical order, case-insensitive
    assert both.name == "lume-task2-task3" and both.meta["tasks"] == ["Task2", "Task3"]
    # ids do not depend on which tasks are loaded
    assert [t.id for t in load_lume(LUME, ("Task1",)).targets] == ["lume-t1-0a1b2c3d1111"]
    with pytest.raises(ValueError, match="unknown LUME task 'Task4'.*accepted: Task1, Task2, Task3"):
        load_lume(LUME, ("Task4",))


def test_story_names_skip_sentence_openers() -> None:
    doc = "Despite the rain, Ada walked to Lark Hill. Ada smiled. Suddenly the bells rang. Bram followed Ada."
    assert story_names(doc) == ["Ada", "Lark Hill"]  # "Bram" only opens a sentence, like "Despite" and "Suddenly"
    assert story_names(doc, ["Who followed Ada?", "Bram"]) == ["Ada", "Lark Hill", "Bram"]
    assert story_names("Bram left. Cora stayed.", ["Did Cora stay?", "Yes"]) == ["Cora"]  # so does a question
    assert story_names("Then Dr. Voss arrived. Voss was late.") == ["Voss"]  # "Dr." ends no sentence


def _lume_copy(tmp_path: Path, edit: dict[int, dict[str, object] | None]) -> Path:
    """The LUME fixture with forget.jsonl lines edited (a dict: fields to set, None deletes one) or dropped (None)."""
    folder = tmp_path / "lume"
    folder.mkdir()
    (folder / "retain.jsonl").write_text((LUME / "retain.jsonl").read_text())
    lines = []
    for i, line in enumerate((LUME / "forget.jsonl").read_text().splitlines(), start=1):
        if i in edit:
            if edit[i] is None:
                continue
            rec = {**json.loads(line), **edit[i]}
            line = json.dumps({k: v for k, v in rec.items() if v is not None})
        lines.append(line)
    (folder / "forget.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize(("edit", "message"), [
    ({2: {"task": "Task4"}}, r"forget\.jsonl: record at line 2: field task: 'Task4' is not a LUME task; accepted: Task1"),
    ({4: {"id": "5e6f7a8b-aaaa"}}, r"forget\.jsonl: record at line 4: field id: '5e6f7a8b-aaaa' is not a document id followed by sc<N>"),
    ({4: {"output": "  "}}, r"forget\.jsonl: record at line 4: field output: expected a non-empty string"),
    ({6: {"input": 7}}, r"forget\.jsonl: record at line 6: field input: expected a non-empty string, got int 7"),
    ({9: {"input": None}}, r"forget\.jsonl: record at line 9: field input: expected a non-empty string, got missing"),
    ({3: None}, r"forget\.jsonl: record at line 3 \(document '5e6f7a8b-.*', Task2\): field id: the document has no "
                r"sc<N> record"),
    ({10: None}, r"forget\.jsonl: record at line 9 \(document '61523514', Task3\): field id: the document has no "
                 r"qa<N> record"),
    ({5: {"id": "5e6f7a8b-aaaa-4bbb-8ccc-ddddddddddddqa0"}},
     r"forget\.jsonl: record at line 5: field id: .* repeats the id of the record at line 4"),
    ({10: {"task": "Task1"}}, r"forget\.jsonl: record at line 10: field task: 'Task1', but document '61523514' is "
                              r"Task3 at the record at line 9"),
])
def test_lume_malformed_records(tmp_path: Path, edit: dict[int, dict[str, object] | None], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        load_lume(_lume_copy(tmp_path, edit))


def test_lume_missing_files(tmp_path: Path) -> None:
    folder = _lume_copy(tmp_path, {})
    (folder / "retain.jsonl").unlink()
    with pytest.raises(DataFilesNotFoundError, match=r"LUME retain split: .*retain\.jsonl not found; files in .*: "
                                                     r"forget\.jsonl"):
        load_lume(folder)
    with pytest.raises(DataFilesNotFoundError, match="LUME folder .*nope not found"):
        load_lume(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# Task specs
# ------------------------------------------------------------------------------------------------

def test_parse_task_spec() -> None:
    assert parse_task_spec("wmdp:bio,chem,mmlu=none@/x/y") == ("wmdp", ["bio", "chem"], {"mmlu": "none"}, Path("/x/y"))
    assert parse_task_spec("offline") == ("offline", [], {}, None)
    with pytest.raises(TaskSpecError, match="empty argument"):
        parse_task_spec("tofu:forget05,,x")


def test_spec_offline_and_task_file(tmp_path: Path) -> None:
    task = load_task_spec("offline:seed=3,num_people=12")
    assert task.name == "offline-seed3" and task.meta["config"]["num_people"] == 12
    path = save_task(task, tmp_path / "t.jsonl")
    assert load_task_spec(str(path)).model_dump() == task.model_dump()
    with pytest.raises(TaskSpecError, match="num_peple"):
        load_task_spec("offline:num_peple=3")
    with pytest.raises(TaskSpecError, match="num_people"):
        load_task_spec("offline:num_people=1")
    with pytest.raises(SchemaError, match="no such file"):
        load_task_spec(str(tmp_path / "missing.json"))


def test_spec_fixture_sources() -> None:
    tofu = load_task_spec(f"tofu:forget10,qa_per_author=3@{FIX / 'tofu'}")
    assert isinstance(tofu, ForgetTask) and len(tofu.targets) == 2
    wmdp = load_task_spec(f"wmdp:bio,chem@{FIX / 'wmdp'}")  # sibling mmlu/ exists in fixtures: related subjects
    # related subjects that exist are used, the missing chemistry ones are skipped with a warning
    assert [t.id for t in wmdp.targets] == ["wmdp-bio", "wmdp-chem"] and len(wmdp.retain_mcq) == 3
    assert load_task_spec(f"wmdp:bio,mmlu=none@{FIX / 'wmdp'}").retain_mcq == []
    assert len(load_task_spec(f"wmdp:bio,mmlu=virology@{FIX / 'wmdp'}").retain_mcq) == 2
    assert load_task_spec(f"muse:books@{FIX / 'muse'}").name == "muse-books"


def test_spec_env_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNLEARN_GUARD_DATA", str(FIX))
    assert load_task_spec("muse").name == "muse-news"
    assert len(load_task_spec("wmdp:chem,mmlu=none").targets) == 1


def test_spec_lume() -> None:
    assert load_task_spec(f"lume@{LUME}").name == "lume"
    assert [t.id for t in load_task_spec(f"lume:task3@{LUME}").targets] == ["lume-t3-61523514", "lume-t3-4705442"]
    assert load_task_spec(f"lume:task2,task3@{LUME}").name == "lume-task2-task3"
    assert load_task_spec(f"lume:Task1@{LUME}").name == "lume-task1"
    assert parse_task_spec("lume:task2,task3@/d/lume") == ("lume", ["task2", "task3"], {}, Path("/d/lume"))


def test_spec_lume_env_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNLEARN_GUARD_DATA", str(FIX))  # <data>/lume is the default folder
    assert len(load_task_spec("lume:task2").targets) == 2


@pytest.mark.parametrize(("spec", "message"), [
    ("lume:task4", r"lume: unexpected arguments \['task4'\]; accepted arguments: task1, task2, task3"),
    ("lume:task3,poems", r"unexpected arguments \['poems'\]; accepted arguments: task1, task2, task3"),
    ("lume:split=forget", r"lume: unexpected options \['split=forget'\]; lume takes no options; accepted arguments"),
])
def test_spec_lume_rejects_unknown_args(spec: str, message: str) -> None:
    with pytest.raises(TaskSpecError, match=message):
        load_task_spec(spec)


@pytest.mark.parametrize("spec", ["", "imagenet", "imagenet:train@/x", "tofu:forget05,forget01", "muse:news,x=1",
                                  "wmdp:bio,colour=red", "offline@/x", "task.yaml"])
def test_bad_specs_list_accepted_forms(spec: str) -> None:
    with pytest.raises(TaskSpecError) as e:
        load_task_spec(spec)
    if spec in ("", "imagenet", "imagenet:train@/x", "task.yaml"):
        assert "accepted forms" in str(e.value) and "tofu:forget05" in str(e.value)
        assert "lume:task2,task3@/path/to/lume" in str(e.value)


# ------------------------------------------------------------------------------------------------
# Real public data (skipped when ../shared/data is absent)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("split", "n_forget", "n_retain", "retain"), [
    ("forget01", 40, 3960, "retain99"), ("forget05", 200, 3800, "retain95")])
def test_real_tofu_counts(split: str, n_forget: int, n_retain: int, retain: str) -> None:
    task = load_tofu(real("tofu"), split)
    assert task.meta["retain_split"] == retain
    assert sum(len(t.qa) for t in task.targets) == n_forget and len(task.targets) == n_forget // 20
    assert all(t.meta["name_extracted"] for t in task.targets)
    assert all(q.perturbed_answers and q.paraphrased_answer for q in task.forget_qa)
    assert len([q for q in task.retain_qa if q.kind == "fact"]) == n_retain
    assert len([q for q in task.retain_qa if q.kind == "real_authors"]) == 100
    assert len([q for q in task.retain_qa if q.kind == "world_facts"]) == 117
    assert len(task.retain_mcq) == 217 and len(task.benign_questions) == 217
    # retain_perturbed.json's 400 questions all land on retain items (one question occurs twice in retain)
    assert task.meta["retain_eval_records"] >= 400


def test_real_tofu_author_names_and_ids() -> None:
    f05 = load_tofu(real("tofu"), "forget05")
    f01 = load_tofu(real("tofu"), "forget01")
    assert f05.targets[0].name == "Hina Ameen" and f05.targets[8].name == "Basil Mahfouz Al-Kuwaiti"
    assert [(t.id, t.name) for t in f01.targets] == [(t.id, t.name) for t in f05.targets[-2:]]
    assert f01.targets[-1].id == "tofu-author-199"


def test_real_wmdp_counts() -> None:
    task = load_wmdp(real("wmdp"))
    assert {t.id: len(t.mcq) for t in task.targets} == {"wmdp-bio": 1520, "wmdp-chem": 412, "wmdp-cyber": 2225}
    assert sum(len(t.mcq) for t in task.targets) == 4157


def test_real_wmdp_spec_with_mmlu() -> None:
    real("mmlu")
    task = load_task_spec(f"wmdp:cyber@{real('wmdp')}")
    assert len(task.targets[0].mcq) == 2225
    assert {m.subject for m in task.retain_mcq} == {"college computer science", "computer security"}


def test_real_mmlu_counts() -> None:
    root = real("mmlu")
    assert len(load_mmlu(root, split="dev")) == 285
    assert len(load_mmlu(root, split="test")) == 14042


@pytest.mark.parametrize("corpus", ["news", "books"])
def test_real_muse_counts(corpus: str) -> None:
    task = load_muse(real("muse"), corpus)
    t = task.targets[0]
    assert len([q for q in t.qa if q.kind == "knowmem"]) == 100 and len(task.retain_qa) == 100
    assert len(task.meta["knowmem_icl"]["forget"]) == 10
    if corpus == "news":
        assert len([q for q in t.qa if q.kind == "verbmem"]) == 100
        assert len(t.texts) == 100 and len(task.retain_texts) == 100 and len(task.holdout_texts) == 100


def test_real_tofu_retain_subjects_per_author() -> None:
    task = load_tofu(real("tofu"), "forget05")
    facts = [q for q in task.retain_qa if q.kind == "fact"]
    assert len(facts) == 3800 and all(q.subject and q.subject.strip() for q in facts)
    subjects = list(dict.fromkeys(q.subject for q in facts))
    assert len(subjects) == 190  # one per retain author
    assert not set(subjects) & {n for t in task.targets for n in t.names}  # no retain author is a forget target


def test_real_lume_counts_and_names() -> None:
    task = load_lume(real("lume"))
    counts = task.meta["counts"]
    assert {k: v["targets"] for k, v in counts.items()} == {"Task1": 243, "Task2": 250, "Task3": 373}
    by_task = {k: [t for t in task.targets if t.meta["task"] == k] for k in counts}
    for name, per_doc in (("Task1", 1), ("Task2", 5), ("Task3", 1)):
        assert all(len([q for q in t.qa if q.kind == "fact"]) == per_doc for t in by_task[name])
        assert all([q.kind for q in t.qa][-1] == "verbmem" for t in by_task[name])
    assert sum(q.kind == "fact" for t in by_task["Task3"] for q in t.qa) == 373
    assert len(task.forget_qa) == 2732 and len(task.retain_qa) == 2734
    assert len(task.retain_texts) == 246 + 250 + 371
    assert all(t.kind == "copyright" for t in by_task["Task1"])
    assert all(t.kind == "privacy" for t in by_task["Task2"] + by_task["Task3"])
    assert all(t.name.strip() and t.name in t.texts[0] for t in by_task["Task3"])
    assert all(re.fullmatch(r"lume-t[123]-[0-9a-f]{6,}", t.id) for t in task.targets)
    people = by_task["Task2"] + by_task["Task3"]
    extracted = sum(t.meta["name_extracted"] for t in people) / len(people)
    assert extracted >= 0.95, f"names found for only {extracted:.1%} of Task2/Task3 targets"
    assert all(t.name in t.texts[0] for t in by_task["Task2"] if t.meta["name_extracted"])
    assert {t.name for t in task.targets if t.id == "lume-t3-61523514"} == {"Benjamin Myers"}
    assert all(q.subject for q in task.retain_qa)
    assert all(t.names[0].startswith("LUME story ") and len(t.names) <= 5 for t in by_task["Task1"])


def test_real_lume_spec_one_task() -> None:
    task = load_task_spec(f"lume:task3@{real('lume')}")
    assert task.name == "lume-task3" and len(task.targets) == 373 and len(task.retain_texts) == 371
