-- The incremental variant of 10_staging.sql + 20_scores.sql: applies to the staging table
-- only the rows that changed in the mirror since the last run (inserted, modified or
-- removed items, agents that appeared, left or moved domain), then recomputes only the
-- agents and users those rows touch. Follow it with 25_today.sql, like the full run.
--
-- Zero-ETL gives no change log, so finding the changed rows still reads the mirror once;
-- what shrinks is everything after: staging writes, aggregation and result writes scale
-- with the change, not with the history. Patterns are grouped per user, so a touched
-- user's patterns are recomputed whole; the recommendation cut is global and is
-- recomputed by 25_today.sql over the (small) pattern table.
--
-- Needs: 00_schema.sql; enable_case_sensitive_identifier. Temporary tables live for the
-- session, which is the batch of one `toolrank warehouse score --incremental`.

DELETE FROM agent_catalog;
INSERT INTO agent_catalog SELECT * FROM agent_catalog_source;

CREATE TEMP TABLE staging_next AS SELECT * FROM agent_tool_analysis_source;

-- One pass over both sides: a row of the staging table with no equal row in the next
-- state is gone (its key's old version); a next-state row with no equal row is new.
CREATE TEMP TABLE staging_diff AS
SELECT n.userid IS NOT NULL AS is_new,
       COALESCE(n.userid, s.userid) AS userid, COALESCE(n.sessionid, s.sessionid) AS sessionid,
       COALESCE(n.processid, s.processid) AS processid, n.domainid,
       COALESCE(n.agentid, s.agentid) AS agentid, COALESCE(n.toolid, s.toolid) AS toolid,
       n.toolnm, n.execution_date, n.execution_datetime, n.success_flag, n.tool_values,
       n.result_message, n.load_timestamp
FROM agent_tool_analysis_staging s
FULL OUTER JOIN staging_next n
  ON n.userid = s.userid AND n.sessionid = s.sessionid AND n.processid = s.processid
 AND n.agentid = s.agentid AND n.toolid = s.toolid AND n.domainid = s.domainid
 AND n.toolnm = s.toolnm AND n.execution_datetime = s.execution_datetime AND n.success_flag = s.success_flag
WHERE n.userid IS NULL OR s.userid IS NULL;

CREATE TEMP TABLE touched_agents AS SELECT DISTINCT agentid FROM staging_diff;

CREATE TEMP TABLE touched_users AS SELECT DISTINCT userid FROM staging_diff;

DELETE FROM agent_tool_analysis_staging
USING staging_diff g
WHERE NOT g.is_new
  AND agent_tool_analysis_staging.userid = g.userid AND agent_tool_analysis_staging.sessionid = g.sessionid
  AND agent_tool_analysis_staging.processid = g.processid AND agent_tool_analysis_staging.agentid = g.agentid
  AND agent_tool_analysis_staging.toolid = g.toolid;

INSERT INTO agent_tool_analysis_staging
SELECT userid, sessionid, processid, domainid, agentid, toolid, toolnm, execution_date,
       execution_datetime, success_flag, tool_values, result_message, load_timestamp
FROM staging_diff WHERE is_new;

-- Names live in the catalog, not in staging: an agent renamed without new rows is touched too.
DELETE FROM agent_score_summary
WHERE agentid IN (SELECT agentid FROM touched_agents)
   OR agentid NOT IN (SELECT agentid FROM agent_catalog)
   OR agentid IN (SELECT s.agentid FROM agent_score_summary s JOIN agent_catalog c ON c.agentid = s.agentid
                  WHERE s.agentnm IS DISTINCT FROM c.agentnm);
INSERT INTO agent_score_summary
SELECT f.*, NULL, NULL, NULL FROM agent_score_figures f
WHERE f.agentid NOT IN (SELECT agentid FROM agent_score_summary);

DELETE FROM user_process_patterns WHERE userid IN (SELECT userid FROM touched_users);
INSERT INTO user_process_patterns
SELECT f.*, NULL, NULL FROM user_pattern_figures f
WHERE f.userid IN (SELECT userid FROM touched_users);

DELETE FROM agent_tool_errors;
INSERT INTO agent_tool_errors SELECT * FROM agent_tool_error_figures;

DROP TABLE staging_next;
DROP TABLE staging_diff;
DROP TABLE touched_agents;
DROP TABLE touched_users;
