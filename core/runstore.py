"""The run store: every read and write of a run's tables. The pipeline's stages, `plan()` and the
synthetic caches ask it what is missing and hand it what to write (docs/method.md section 9)."""

from __future__ import annotations

import dataclasses
import json

from core.store import Store, code_version, fetch_one, git_commit, insert_scores, now


@dataclasses.dataclass(frozen=True)
class RunState:
    """What the cache holds of a run: its selection's size and T_bar, its T_cut per alpha, and the
    (label, generation key) of each selected sample."""

    t_bar: float
    n_selected: int
    t_cuts: dict[float, int]
    samples: list[tuple[str, str]]


class RunStore:
    """Every read and write of a run's tables. Each call is one transaction; reads of a cache that
    does not exist yet find nothing (and create nothing)."""

    def __init__(self, store: Store):
        self.store = store

    def _rows(self, sql: str, params: list) -> list[tuple]:
        if not self.store.exists():
            return []
        with self.store.read() as con:
            return con.execute(sql, params).fetchall()

    # --- inputs -----------------------------------------------------------------------------

    def file_hashes(self) -> dict[str, tuple[int, int, str]]:
        """Known sha256 of files by path, with the size and mtime they were hashed at."""
        return {path: (size, mtime, digest) for path, size, mtime, digest in self._rows(
            "SELECT path, size, mtime_ns, sha256 FROM file_hashes", [])}

    def write_inputs(self, models: list[dict], dataset, file_hashes: list[dict]) -> None:
        """Models (rows of `models` without created_at), a `core.datasets.Dataset` with its
        questions, and newly computed file hashes."""
        created = now()
        with self.store.write() as con:
            Store.insert_rows(con, "file_hashes", file_hashes, replace=True)
            Store.insert_rows(con, "models", [{**row, "created_at": created} for row in models])
            Store.insert_rows(con, "datasets", [{
                "dataset_key": dataset.key, "name": dataset.name, "source": dataset.source,
                "content_hash": dataset.content_hash, "n_questions": len(dataset.questions),
                "created_at": created}])
            Store.insert_rows(con, "questions", [{
                "dataset_key": dataset.key, "question_id": q.id, "question_key": q.key,
                "position": i, "question": q.question, "reference": q.reference}
                for i, q in enumerate(dataset.questions)])

    # --- generate and grade -----------------------------------------------------------------

    def missing_generations(self, keys: list[str]) -> list[str]:
        """The keys among `keys` with no stored answer, in order, each once."""
        have = {row[0] for row in self._rows(
            "SELECT generation_key FROM generations WHERE generation_key IN (SELECT unnest(?))",
            [list(keys)])}
        return [key for key in dict.fromkeys(keys) if key not in have]

    def write_generations(self, rows: list[dict]) -> None:
        """Rows of `generations` without created_at."""
        created = now()
        with self.store.write() as con:
            Store.insert_rows(con, "generations", [{**row, "created_at": created} for row in rows])

    def ungraded(self, keys: list[str]) -> list[tuple[str, str, str]]:
        """(generation key, answer text, reference) of the stored, ungraded answers among `keys`."""
        return self._rows("""
            SELECT g.generation_key, g.answer_text, q.reference FROM generations g
            JOIN (SELECT question_key, any_value(reference) AS reference FROM questions
                  GROUP BY question_key) q ON q.question_key = g.question_key
            LEFT JOIN grades gr ON gr.generation_key = g.generation_key
            WHERE gr.generation_key IS NULL AND g.generation_key IN (SELECT unnest(?))
            ORDER BY g.generation_key""", [list(keys)])

    def write_grades(self, rows: list[dict]) -> None:
        """Rows of `grades` without created_at."""
        created = now()
        with self.store.write() as con:
            Store.insert_rows(con, "grades", [{**row, "created_at": created} for row in rows])

    # --- select -----------------------------------------------------------------------------

    def selection_candidates(self, keys: list[str]) -> dict[str, tuple[int, int, bool]]:
        """(answer length, prompt length, correct) of each graded answer among `keys`."""
        return {key: (answer_len, prompt_len, bool(correct))
                for key, answer_len, prompt_len, correct in self._rows("""
                    SELECT g.generation_key, len(g.answer_ids), len(g.prompt_ids), gr.correct
                    FROM generations g JOIN grades gr ON gr.generation_key = g.generation_key
                    WHERE g.generation_key IN (SELECT unnest(?))""", [list(keys)])}

    def run_state(self, run_key: str) -> RunState | None:
        found = self._rows("SELECT t_bar, n_selected FROM runs WHERE run_key = ?", [run_key])
        if not found:
            return None
        t_cuts = dict(self._rows("SELECT alpha, t_cut FROM run_alphas WHERE run_key = ?", [run_key]))
        samples = self._rows("SELECT label, generation_key FROM run_samples WHERE run_key = ? "
                             "ORDER BY label, position", [run_key])
        return RunState(found[0][0], found[0][1], t_cuts, samples)

    def write_run(self, run: dict, models: list[dict], samples: list[dict],
                  t_cuts: dict[float, int]) -> bool:
        """A run's row (without code version and times), its models, its selected samples and its
        T_cut per alpha; existing rows are kept. Returns whether the run or an alpha was new."""
        created = now()
        run_key = run["run_key"]
        with self.store.write() as con:
            is_new = fetch_one(con, "SELECT count(*) FROM runs WHERE run_key = ?", [run_key])[0] == 0
            known = {row[0] for row in con.execute("SELECT alpha FROM run_alphas WHERE run_key = ?",
                                                   [run_key]).fetchall()}
            Store.insert_rows(con, "runs", [{**run, "code_version": code_version(),
                                             "git_commit": git_commit(), "created_at": created,
                                             "updated_at": created}])
            Store.insert_rows(con, "run_models", [{"run_key": run_key, **row} for row in models])
            Store.insert_rows(con, "run_samples", [{"run_key": run_key, **row} for row in samples])
            Store.insert_rows(con, "run_alphas", [{"run_key": run_key, "alpha": alpha, "t_cut": cut}
                                                  for alpha, cut in t_cuts.items()])
        return is_new or bool(set(t_cuts) - known)

    # --- score ------------------------------------------------------------------------------

    def missing_scores(self, wanted: list[tuple[str, int]], score_key: str,
                       scorer_key: str) -> list[tuple[str, int]]:
        """The (generation key, T_cut) pairs among `wanted` with no scores by the model `scorer_key`
        (the answer's own model, or another one for cross-scoring), in order."""
        have = set(self._rows(
            "SELECT generation_key, t_cut FROM scores WHERE score_key = ? AND model_key = ? AND "
            "generation_key IN (SELECT unnest(?))",
            [score_key, scorer_key, sorted({key for key, _ in wanted})]))
        return [item for item in wanted if item not in have]

    def generation_tokens(self, keys: list[str]) -> dict[str, tuple[list[int], list[int]]]:
        """Prompt and answer token ids of the answers `keys`, as generated."""
        return {key: (prompt, answer) for key, prompt, answer in self._rows(
            "SELECT generation_key, prompt_ids, answer_ids FROM generations "
            "WHERE generation_key IN (SELECT unnest(?))", [list(keys)])}

    def answers_at(self, run_key: str, alpha: float) -> list[tuple]:
        """The run's selected answers at alpha, base first, each model's in the run's order: rows
        (run name, T_cut, label, role, spec JSON, fingerprint, question id, prompt ids, answer ids);
        empty for an unknown run or alpha."""
        return self._rows("""
            SELECT r.name, a.t_cut, rm.label, rm.role, m.spec, m.fingerprint, rs.question_id,
                   g.prompt_ids, g.answer_ids
            FROM runs r
            JOIN run_alphas a ON a.run_key = r.run_key
            JOIN run_models rm ON rm.run_key = r.run_key
            JOIN models m ON m.model_key = rm.model_key
            JOIN run_samples rs ON rs.run_key = r.run_key AND rs.label = rm.label
            JOIN generations g ON g.generation_key = rs.generation_key
            WHERE r.run_key = ? AND a.alpha = ?
            ORDER BY rm.role <> 'base', rm.position, rs.position""", [run_key, alpha])

    def write_scores(self, run_key: str, rows: list[dict], vectors, parts=None) -> None:
        """Score rows (without code version and time; model_key is the scorer, so a row of model A
        on model B's answer is a cross score) with their real-edge vectors [n, n_edges] and
        optionally their position parts [n, len(POSITION_GROUPS), n_edges] (see
        store.insert_scores), in one transaction that also marks the run updated."""
        created = now()
        with self.store.write() as con:
            insert_scores(con, [{**row, "code_version": code_version(), "created_at": created}
                                for row in rows], vectors, parts)
            con.execute("UPDATE runs SET updated_at = ? WHERE run_key = ?", [created, run_key])

    # --- controls (docs/method.md section 8) --------------------------------------------------

    def cross_vectors(self, run_key: str, t_cut: int, scorer_label: str,
                      tokens_label: str) -> tuple[list[str], list[int]]:
        """S(scorer, tokens): (question ids, vector ids) of the model `scorer_label` scored on the
        answers of `tokens_label` at `t_cut`, under the run's score settings, in selection order.
        Labels are the run's model labels ("base" names the base). Only complete questions are
        given: those with all four scores of the two models (each on its own and on the other's
        tokens), so every combination of the two labels lists the same questions; with equal
        labels, a model's own scores. Vectors: store.fetch_vectors(con, n_edges, ids)."""
        rows = self._score_column(run_key, t_cut, scorer_label, tokens_label, "vector_id")
        return [q for q, _ in rows], [int(v) for _, v in rows]

    def part_vector_ids(self, run_key: str, t_cut: int, scorer_label: str,
                        tokens_label: str | None = None) -> tuple[list[str], list[list[int] | None]]:
        """Like cross_vectors (tokens_label None: the scorer's own answers), with each score's
        position-part vector ids in core.eap.POSITION_GROUPS order (None where the row was scored
        without parts)."""
        rows = self._score_column(run_key, t_cut, scorer_label, tokens_label or scorer_label,
                                  "part_vector_ids")
        return [q for q, _ in rows], [None if v is None else [int(i) for i in v] for _, v in rows]

    def _score_column(self, run_key: str, t_cut: int, scorer_label: str, tokens_label: str,
                      column: str) -> list[tuple]:
        labels = self._labels(run_key)
        scorer, tokens = (self._label(labels, run_key, name) for name in (scorer_label, tokens_label))
        both = sorted({scorer, tokens})
        return self._rows(f"""
            SELECT rs.question_id, s.{column} FROM run_samples rs
            JOIN runs r ON r.run_key = rs.run_key
            JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = r.score_key
                AND s.t_cut = $t_cut AND s.model_key = $scorer_key
            WHERE rs.run_key = $run_key AND rs.label = $tokens AND rs.question_id IN (
                SELECT rs2.question_id FROM run_samples rs2
                JOIN run_models m ON m.run_key = rs2.run_key AND m.label IN (SELECT unnest($both))
                JOIN scores s2 ON s2.generation_key = rs2.generation_key
                    AND s2.score_key = r.score_key AND s2.t_cut = $t_cut
                    AND s2.model_key = m.model_key
                WHERE rs2.run_key = $run_key AND rs2.label IN (SELECT unnest($both))
                GROUP BY rs2.question_id HAVING count(*) = $n_combinations)
            ORDER BY rs.position""",
            {"run_key": run_key, "t_cut": int(t_cut), "scorer_key": labels[scorer][1],
             "tokens": tokens, "both": both, "n_combinations": len(both) ** 2})

    def _labels(self, run_key: str) -> dict[str, tuple[str, str]]:
        return {label: (role, key) for label, role, key in self._rows(
            "SELECT label, role, model_key FROM run_models WHERE run_key = ?", [run_key])}

    @staticmethod
    def _label(labels: dict[str, tuple[str, str]], run_key: str, name: str) -> str:
        if name == "base":
            name = next((label for label, (role, _) in labels.items() if role == "base"), name)
        if name not in labels:
            raise KeyError(f"run {run_key!r} has no model labelled {name!r}; its labels: "
                           f"{sorted(labels)}")
        return name

    def controls_of(self, run_key: str) -> list[dict]:
        """The run's control runs: rows of run_controls (run_key, post_label, control,
        control_run_key, created_at), by post label and control."""
        columns = ("run_key", "post_label", "control", "control_run_key", "created_at")
        return [dict(zip(columns, row)) for row in self._rows(
            f"SELECT {', '.join(columns)} FROM run_controls WHERE run_key = ? "
            f"ORDER BY post_label, control", [run_key])]

    def write_control(self, run_key: str, post_label: str, control: str,
                      control_run_key: str) -> None:
        """Link the run of a control (a null model vs the base) to the run and post model it
        controls; an existing link is kept."""
        with self.store.write() as con:
            Store.insert_rows(con, "run_controls", [{
                "run_key": run_key, "post_label": post_label, "control": control,
                "control_run_key": control_run_key, "created_at": now()}])

    def write_faithfulness(self, run_key: str, alpha: float, label: str, settings_key: str,
                           settings: dict, report: dict) -> None:
        """One model's faithfulness report at one alpha of a run (the faithfulness control), in one
        transaction that also marks the run updated (so the read model's views of it refresh)."""
        created = now()
        with self.store.write() as con:
            Store.insert_rows(con, "faithfulness", [{
                "run_key": run_key, "alpha": alpha, "label": label, "settings_key": settings_key,
                "settings": json.dumps(settings), "report": json.dumps(report, allow_nan=False),
                "created_at": created}])
            con.execute("UPDATE runs SET updated_at = ? WHERE run_key = ?", [created, run_key])

    def missing_faithfulness(self, run_key: str, settings_key: str,
                             wanted: list[tuple[float, str]]) -> list[tuple[float, str]]:
        """The (alpha, label) pairs among `wanted` without a stored faithfulness report."""
        have = set(self._rows("SELECT alpha, label FROM faithfulness WHERE run_key = ? AND "
                              "settings_key = ?", [run_key, settings_key]))
        return [item for item in wanted if item not in have]

    def past_seconds(self, model_keys: list[str]) -> dict:
        """Mean seconds per generated answer of these models so far (None: none yet), and per
        scored sample by the score settings they were scored under: (settings dict, mean seconds,
        samples) for each score key, the settings of a run that used it."""
        generate = self._rows("SELECT avg(seconds) FROM generations WHERE model_key IN "
                              "(SELECT unnest(?))", [list(model_keys)])
        score = self._rows("""
            SELECT r.score, avg(s.seconds), count(*) FROM scores s
            JOIN (SELECT score_key, any_value(score) AS score FROM runs GROUP BY score_key) r
                ON r.score_key = s.score_key
            WHERE s.model_key IN (SELECT unnest(?)) GROUP BY r.score_key, r.score""",
                           [list(model_keys)])
        return {"generate": generate[0][0] if generate else None,
                "score": [(json.loads(settings), seconds, n) for settings, seconds, n in score]}

    # --- metrics and timings ----------------------------------------------------------------

    def missing_metrics(self, run_key: str, settings_key: str,
                        wanted: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """The (post label, alpha) pairs among `wanted` without a stored comparison."""
        have = set(self._rows("SELECT post_label, alpha FROM metrics WHERE run_key = ? AND "
                              "settings_key = ?", [run_key, settings_key]))
        return [item for item in wanted if item not in have]

    def write_metrics(self, run_key: str, post_label: str, alpha: float, settings,
                      comparison: dict) -> None:
        """A comparison (`Comparison.to_dict()`) under its `MetricSettings`."""
        with self.store.write() as con:
            Store.insert_rows(con, "metrics", [{
                "run_key": run_key, "post_label": post_label, "alpha": alpha,
                "settings_key": settings.key(), "settings": json.dumps(settings.as_dict()),
                "comparison": json.dumps(comparison), "created_at": now()}])

    def write_timing(self, run_key: str, stage: str, items: int, seconds: float) -> None:
        with self.store.write() as con:
            Store.insert_rows(con, "stage_timings", [{
                "run_key": run_key, "stage": stage, "items": items, "seconds": seconds,
                "code_version": code_version(), "git_commit": git_commit(), "created_at": now()}])
