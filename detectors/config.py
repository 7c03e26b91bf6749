"""The detector's configuration: one pydantic model, saved with every built detector."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.encoder_export import EncoderBackend
from detectors.index import DEFAULT_ANN, DEFAULT_ANN_THRESHOLD, DEFAULT_NPROBE, AnnKind


class DetectorConfig(BaseModel):
    """Knobs of the forget-target detector; defaults are the ones measured in the report."""

    model_config = ConfigDict(extra="forbid")

    encoder: str = Field("minilm-l6", description="Sentence encoder: embedded name, local dir or hub id.")
    encoder_backend: EncoderBackend = Field(
        "onnx", description="Encoder runtime: a local ONNX Runtime export of the encoder (fp32, the default: the same "
                            "decisions as torch at ~2x the speed), its int8 version, OpenVINO (the openvino extra) or "
                            "the torch model itself. Exports are made once and cached. 'onnx' and 'openvino' give "
                            "torch's embeddings; after switching to or from 'onnx-int8', rebuild the detector (its "
                            "thresholds are calibrated on its own runtime's embeddings).")
    target_fpr: float = Field(0.01, gt=0.0, lt=0.5, description="False-positive rate the threshold guarantees (alpha).")
    calibration: Literal["group", "pooled"] = Field(
        "group", description="'group': threshold = max of pooled and per-negative-group conformal thresholds.")
    placement: Literal["midpoint", "conformal"] = Field(
        "midpoint", description="'midpoint': raise the conformal threshold to the logit midpoint with the positives "
                                "(keeps the FPR guarantee, adds margin); 'conformal': use it as is.")
    pos_quantile: float = Field(0.02, gt=0.0, lt=0.5, description="Low quantile of positive scores used by 'midpoint'.")
    top_k: int = Field(16, ge=2, le=256, description="Neighbours retrieved from the forget store per query.")
    ann_threshold: int = Field(DEFAULT_ANN_THRESHOLD, ge=1000,
                               description="Vectors above which a bank moves from exact flat search to IVF.")
    ivf_nprobe: int = Field(DEFAULT_NPROBE, ge=1, description="IVF lists probed per query, of ~4 sqrt(n) (recall vs "
                            "latency; figures per setting in eval/bench/detector_bench.py --index-only).")
    ann_index: AnnKind = Field(
        DEFAULT_ANN, description="Approximate structure above ann_threshold: 'ivf-sq8' (inverted lists of 8-bit codes, "
                                 "the best 64 candidates re-scored exactly; native removal), 'ivf' (lists of float "
                                 "vectors: 25% less RAM, slower per probed vector) or 'hnsw' (graph; removals are "
                                 "tombstones, compacted when a quarter is dead; found the true neighbour of only 25% of "
                                 "hard queries at 1M).")
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW links per node (recall and RAM grow with it).")
    hnsw_ef_search: int = Field(64, ge=8, description="HNSW candidates kept per search (recall vs latency).")
    keep_raw_text: bool = Field(False, description="Keep forget questions/answers/texts; False keeps embeddings only.")
    paraphrase_frames: int = Field(3, ge=0, le=6, description="Conversational frames generated per forget question.")
    name_probes: bool = Field(True, description="Add 'Who is X?'-style probes per target name.")
    statement_prompts: bool = Field(True, description="Add 'Is it true that <answer>?' prompts per forget answer.")
    description_probes: bool = Field(True, description="Store the sentences of forget texts (names masked) as "
                                     "prompts, so questions that describe a target without naming it match.")
    name_rule: bool = Field(True, description="Flag a prompt or answer that contains a stored target's full name or "
                            "alias of 2+ identifying tokens, whatever its score (a bare first name or surname, which "
                            "namesakes share, stays a feature).")
    question_rule: bool = Field(True, description="Flag a prompt with a turn, sentence or window equal to a stored "
                                "forget question after normalisation, whatever its score.")
    similarity_share: float = Field(0.3, ge=0.0, lt=1.0, description="Share of target_fpr spent on the second "
                                    "decision, 'close to a stored forget entry, closer than to any known negative, and "
                                    "naming no one else' (its cosine, calibrated on its own): it catches descriptions without a name that "
                                    "the classifier scores low. The two FPRs add up to target_fpr. 0: off.")
    similarity_floor: float = Field(0.6, ge=-1.0, le=1.0, description="Least cosine the similarity decision needs, "
                                    "whatever its calibrated threshold (raising a threshold keeps the guarantee): "
                                    "below it a text only shares topic words with a description.")
    value_rule: bool = Field(True, description="Flag a prompt or answer that states an identifying value of a "
                             "target (an e-mail address, a number of 6+ digits such as a phone, account or ID number, "
                             "from its answers and texts; stored as salted hashes; dates are not values: people "
                             "share birthdays).")
    birth_date_rule: bool = Field(True, description="Prompt check: a text that gives a birth date (day, month, year) "
                                  "the target's data states is about that target (flagged, as a full name is); one "
                                  "that does not name the target and gives only other birth dates is not (that pair "
                                  "scores 0 for the classifier and the similarity decision). In calibration as in "
                                  "detection; targets without a stored birth date are unaffected.")
    fact_rule: bool = Field(True, description="Output check: flag an answer that states a stored fact of a target "
                            "(a place, a year, a title an answer added to its question) when the conversation is "
                            "about that target (it flagged it, or names it, also by a first name or surname alone), "
                            "named in the answer or not.")
    calibration_prompts: bool = Field(True, description="Calibrate on composed prompts too (multi-turn "
                                      "conversations, long messages, system turns), scored as deployed.")
    builtin_benign: bool = Field(True, description="Use the built-in benign questions as extra negatives.")
    calib_fraction: float = Field(0.4, gt=0.0, lt=1.0, description="Share of negatives held out for calibration.")
    max_negatives_per_group: int = Field(1500, ge=10, description="Cap per negative group (large retain sets are subsampled).")
    split_seed: int = Field(0, description="Seed of the train/calibration split of negatives.")
    l2: float = Field(1.0, gt=0.0, description="Inverse regularisation strength C of the logistic regression.")
    batch_size: int = Field(64, ge=1, description="Encoder batch size.")
    faiss_threads: int | None = Field(1, ge=1, description="faiss OpenMP threads (process-wide; None: faiss default). "
                                                          "1 is fastest for single queries on small banks.")
    max_turns: int = Field(32, ge=1, description="Most recent chat turns scored per prompt.")
    window_words: int = Field(96, ge=16, description="Long units are scored in windows of this many words...")
    window_stride: int = Field(64, ge=8, description="...advanced by this many words (the encoder truncates at 256 tokens).")
    text_chunk_words: int = Field(60, ge=8, description="Forget texts are stored as chunks of about this many words.")
