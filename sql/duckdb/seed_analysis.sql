-- The seed's analysis (SPEC §3) in DuckDB over a DynamoDB export (one {"Item":…} per line).
-- Used by bench/replay.sh to check toolrank's results and compare speed. Parameters are
-- substituted by bench/duckdb_replay.py: {input} (the export file), {today} (YYYY-MM-DD).
-- An export holds the table's current state, one line per item, so no deduplication is
-- needed. Redshift's dialect (SUPER navigation, LISTAGG … WITHIN GROUP, GETDATE) differs:
-- the Redshift versions of these queries are in sql/redshift/

CREATE TABLE items AS
SELECT Item.PK.S AS pk, Item.SK.S AS sk, Item.EntityType.S AS entity_type,
       Item.GSI1_PK.S AS gsi1_pk, Item.AgentNM.S AS agentnm, Item.ToolNM.S AS toolnm,
       Item.TransactDT.S AS transactdt, Item.SuccYN.S AS succyn
FROM read_json('{input}', format = 'newline_delimited', columns = {
    'Item': 'STRUCT(PK STRUCT(S VARCHAR), SK STRUCT(S VARCHAR), EntityType STRUCT(S VARCHAR),
                    GSI1_PK STRUCT(S VARCHAR), AgentNM STRUCT(S VARCHAR), ToolNM STRUCT(S VARCHAR),
                    TransactDT STRUCT(S VARCHAR), SuccYN STRUCT(S VARCHAR))'});

CREATE TABLE agents AS
SELECT pk AS agentid, gsi1_pk AS domainid, agentnm
FROM items WHERE entity_type = 'Agent' AND sk = 'METADATA';

CREATE TABLE agent_tool_analysis_staging AS
SELECT split_part(h.pk, '#', 1) AS userid, split_part(h.pk, '#', 2) AS sessionid,
       split_part(h.sk, '#', 1) AS processid, a.domainid, split_part(h.sk, '#', 2) AS agentid,
       split_part(h.sk, '#', 3) AS toolid, h.toolnm,
       strptime(substr(h.transactdt, 1, 8), '%Y%m%d')::DATE AS execution_date,
       strptime(h.transactdt, '%Y%m%d%H%M%S') AS execution_datetime,
       h.succyn = 'Y' AS success_flag
FROM items h JOIN agents a ON a.agentid = split_part(h.sk, '#', 2)
WHERE h.entity_type = 'UserSessPrcToolMappHist';

CREATE TABLE agent_executions AS
SELECT userid, sessionid, domainid, agentid,
       bool_and(success_flag) AS success, max(execution_date) AS execution_date
FROM agent_tool_analysis_staging GROUP BY userid, sessionid, domainid, agentid;

CREATE TABLE agent_score_summary AS
WITH s AS (
  SELECT e.domainid, e.agentid, count(*) AS total_executions,
         sum(e.success::INT) AS success_count, max(e.execution_date) AS last_execution_date
  FROM agent_executions e GROUP BY e.domainid, e.agentid
), d AS (
  SELECT s.*, date_diff('day', last_execution_date, DATE '{today}') AS days_since_last_exec,
         success_count::DOUBLE / total_executions AS success_rate
  FROM s
)
SELECT d.domainid, d.agentid, a.agentnm, total_executions, success_count,
       total_executions - success_count AS failure_count, success_rate, last_execution_date,
       days_since_last_exec, exp(-0.1 * days_since_last_exec) AS time_decay_factor,
       total_executions * exp(-0.1 * days_since_last_exec) * power(success_rate, 2) AS calculated_score
FROM d JOIN agents a USING (agentid)
ORDER BY calculated_score DESC, domainid, agentid;

CREATE TABLE user_process_patterns AS
WITH runs AS (
  SELECT userid, agentid, sessionid,
         string_agg(processid, '->' ORDER BY execution_datetime, processid, toolid) AS process_pattern,
         string_agg(toolnm, '->' ORDER BY execution_datetime, processid, toolid) AS tool_sequence,
         bool_and(success_flag) AS success,
         min(execution_date) AS first_date, max(execution_date) AS last_date
  FROM agent_tool_analysis_staging GROUP BY userid, agentid, sessionid
), p AS (
  SELECT userid, process_pattern, agentid AS agent_sequence, tool_sequence,
         count(*) AS execution_count, sum(success::INT) AS success_count,
         min(first_date) AS first_used_date, max(last_date) AS last_used_date
  FROM runs GROUP BY userid, process_pattern, agentid, tool_sequence
), scored AS (
  SELECT p.*, execution_count * power(success_count::DOUBLE / execution_count, 2)
              * exp(-0.05 * date_diff('day', last_used_date, DATE '{today}')) AS pattern_score
  FROM p
)
SELECT scored.*, pattern_score >= (SELECT percentile_cont(0.8) WITHIN GROUP (ORDER BY pattern_score) FROM scored) AS is_recommended
FROM scored ORDER BY pattern_score DESC, userid, process_pattern, agent_sequence, tool_sequence;

CREATE TABLE agent_tool_errors AS
WITH agent_totals AS (
  SELECT agentid, count(*) AS total_executions FROM agent_tool_analysis_staging GROUP BY agentid
), agent_errors AS (
  SELECT agentid, count(*) AS total_errors,
         string_agg(DISTINCT toolnm, ', ' ORDER BY toolnm) AS failed_tools
  FROM agent_tool_analysis_staging WHERE NOT success_flag GROUP BY agentid
)
SELECT t.agentid, a.agentnm AS agent_name, t.total_executions, e.total_errors,
       e.total_errors::DOUBLE / t.total_executions AS error_rate, e.failed_tools
FROM agent_totals t JOIN agent_errors e USING (agentid) JOIN agents a USING (agentid)
ORDER BY error_rate DESC, total_errors DESC, agentid;
