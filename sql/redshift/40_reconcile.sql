-- Reconciliation inside the warehouse: each analysis table against a recount from the
-- staging table (the views of 00_schema.sql). One row per disagreement; none when the
-- stored tables are what the staging table implies (after an incremental run, say).
-- `toolrank reconcile` runs it before comparing the warehouse with the streaming sinks.
--
-- Needs: 00_schema.sql; enable_case_sensitive_identifier.

SELECT 'agent_score_summary' AS table_name, COALESCE(s.agentid, f.agentid) AS row_key,
       CASE WHEN s.agentid IS NULL THEN 'missing in table'
            WHEN f.agentid IS NULL THEN 'not in recount'
            ELSE 'differs' END AS issue
FROM agent_score_summary s
FULL OUTER JOIN agent_score_figures f ON f.agentid = s.agentid AND f.domainid = s.domainid
WHERE s.agentid IS NULL OR f.agentid IS NULL
   OR s.total_executions <> f.total_executions OR s.success_count <> f.success_count
   OR s.last_execution_date <> f.last_execution_date OR s.agentnm IS DISTINCT FROM f.agentnm
UNION ALL
SELECT 'user_process_patterns', COALESCE(s.userid, f.userid) || ' ' || COALESCE(s.process_pattern, f.process_pattern),
       CASE WHEN s.userid IS NULL THEN 'missing in table'
            WHEN f.userid IS NULL THEN 'not in recount'
            ELSE 'differs' END
FROM user_process_patterns s
FULL OUTER JOIN user_pattern_figures f
  ON f.userid = s.userid AND f.process_pattern = s.process_pattern
 AND f.agent_sequence = s.agent_sequence AND f.tool_sequence = s.tool_sequence
WHERE s.userid IS NULL OR f.userid IS NULL
   OR s.execution_count <> f.execution_count OR s.success_count <> f.success_count
   OR s.first_used_date <> f.first_used_date OR s.last_used_date <> f.last_used_date
UNION ALL
SELECT 'agent_tool_errors', COALESCE(s.agentid, f.agentid),
       CASE WHEN s.agentid IS NULL THEN 'missing in table'
            WHEN f.agentid IS NULL THEN 'not in recount'
            ELSE 'differs' END
FROM agent_tool_errors s
FULL OUTER JOIN agent_tool_error_figures f ON f.agentid = s.agentid
WHERE s.agentid IS NULL OR f.agentid IS NULL
   OR s.total_executions <> f.total_executions OR s.total_errors <> f.total_errors
   OR s.failed_tools <> f.failed_tools
ORDER BY 1, 2;
