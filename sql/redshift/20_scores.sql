-- The seed's three analysis tables from agent_tool_analysis_staging, in full, without the
-- today-dependent columns: 25_today.sql sets those. SPEC §3 semantics (views in
-- 00_schema.sql).
--
-- Needs: 00_schema.sql, 10_staging.sql first; enable_case_sensitive_identifier.

DELETE FROM agent_score_summary;
INSERT INTO agent_score_summary
SELECT f.*, NULL, NULL, NULL FROM agent_score_figures f;

DELETE FROM user_process_patterns;
INSERT INTO user_process_patterns
SELECT f.*, NULL, NULL FROM user_pattern_figures f;

DELETE FROM agent_tool_errors;
INSERT INTO agent_tool_errors SELECT * FROM agent_tool_error_figures;
