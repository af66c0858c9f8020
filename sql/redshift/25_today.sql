-- The columns that depend on the day the scores are read: days since the last execution,
-- the decays exp(-0.1 d) and exp(-0.05 d), and the recommendation cut, pattern_score >=
-- PERCENTILE_CONT(0.8) over all pattern scores. Arithmetic over the finished tables, no
-- re-aggregation: a new day costs one pass over the (small) result tables.
--
-- Parameter: :today as 'YYYY-MM-DD' (`toolrank warehouse score --today` binds it; by hand,
-- replace CAST(:today AS DATE) with TRUNC(GETDATE())).
-- Needs: 20_scores.sql or 30_incremental.sql first; enable_case_sensitive_identifier.

UPDATE agent_score_summary
SET days_since_last_exec = DATEDIFF(day, last_execution_date, CAST(:today AS DATE)),
    time_decay_factor = EXP(-0.1 * DATEDIFF(day, last_execution_date, CAST(:today AS DATE))),
    calculated_score = total_executions * EXP(-0.1 * DATEDIFF(day, last_execution_date, CAST(:today AS DATE)))
                       * POWER(success_rate, 2);

UPDATE user_process_patterns
SET pattern_score = execution_count * POWER(success_count::DOUBLE PRECISION / execution_count, 2)
                    * EXP(-0.05 * DATEDIFF(day, last_used_date, CAST(:today AS DATE)));

UPDATE user_process_patterns
SET is_recommended = pattern_score >= cut.score
FROM (SELECT PERCENTILE_CONT(0.8) WITHIN GROUP (ORDER BY pattern_score) AS score FROM user_process_patterns) cut;
