-- toolrank warehouse schema: the seed's analysis tables (Amazon Redshift).
--
-- Needs: the Zero-ETL integration's table "AgentTable"("PK","SK","value" SUPER). A Zero-ETL
-- destination database is read-only: create these tables in another database and point
-- "AgentTable" below at the mirror with its three-part name (the seed's
-- dbagent.public."AgentTable"). `toolrank mirror` keeps the same table current where there
-- is no Zero-ETL (mirror_schema.sql).
-- and, because the seed quotes mixed-case identifiers and SUPER attributes, both
--   SET enable_case_sensitive_identifier TO true;
--   SET enable_case_sensitive_super_attribute TO true;
-- for the session (`toolrank warehouse` sends them first in every batch).
-- Every statement is idempotent: `toolrank warehouse score` runs this file every time.
--
-- The views hold each computation once: the full run (10, 20) and the incremental one
-- (30) insert from them, the reconciliation (40) compares the tables with them, and the
-- today-dependent columns are set by 25_today.sql, so nothing is rescored from scratch
-- as days pass.

CREATE TABLE IF NOT EXISTS agent_catalog (
    agentid   VARCHAR(256) NOT NULL,
    domainid  VARCHAR(256),
    agentnm   VARCHAR(1024)
) DISTSTYLE ALL;

-- The seed's staging table, plus execution_date/execution_datetime for the scoring.
CREATE TABLE IF NOT EXISTS agent_tool_analysis_staging (
    userid              VARCHAR(256) NOT NULL,
    sessionid           VARCHAR(256) NOT NULL,
    processid           VARCHAR(256) NOT NULL,
    domainid            VARCHAR(256),
    agentid             VARCHAR(256) NOT NULL,
    toolid              VARCHAR(256) NOT NULL,
    toolnm              VARCHAR(1024),
    execution_date      DATE,
    execution_datetime  TIMESTAMP,
    success_flag        BOOLEAN,
    tool_values         VARCHAR(65535),
    result_message      VARCHAR(65535),
    load_timestamp      TIMESTAMP
) DISTKEY(agentid) SORTKEY(agentid, userid, sessionid);

CREATE TABLE IF NOT EXISTS agent_score_summary (
    domainid             VARCHAR(256),
    agentid              VARCHAR(256) NOT NULL,
    agentnm              VARCHAR(1024),
    total_executions     BIGINT,
    success_count        BIGINT,
    failure_count        BIGINT,
    success_rate         DOUBLE PRECISION,
    last_execution_date  DATE,
    days_since_last_exec BIGINT,
    time_decay_factor    DOUBLE PRECISION,
    calculated_score     DOUBLE PRECISION
) DISTSTYLE ALL;

CREATE TABLE IF NOT EXISTS user_process_patterns (
    userid           VARCHAR(256) NOT NULL,
    process_pattern  VARCHAR(65535),
    agent_sequence   VARCHAR(256),
    tool_sequence    VARCHAR(65535),
    execution_count  BIGINT,
    success_count    BIGINT,
    first_used_date  DATE,
    last_used_date   DATE,
    pattern_score    DOUBLE PRECISION,
    is_recommended   BOOLEAN
) DISTKEY(userid);

CREATE TABLE IF NOT EXISTS agent_tool_errors (
    agentid           VARCHAR(256) NOT NULL,
    agent_name        VARCHAR(1024),
    total_executions  BIGINT,
    total_errors      BIGINT,
    error_rate        DOUBLE PRECISION,
    failed_tools      VARCHAR(65535)
) DISTSTYLE ALL;

-- What agent_catalog holds when current: Agent METADATA items.
CREATE OR REPLACE VIEW agent_catalog_source AS
SELECT "PK" AS agentid, "value"."GSI1_PK"."S"::VARCHAR AS domainid, "value"."AgentNM"."S"::VARCHAR AS agentnm
FROM "AgentTable"
WHERE "SK" = 'METADATA' AND "value"."EntityType"."S"::VARCHAR = 'Agent';

-- The seed's SUPER-to-staging transform: one row per UserSessPrcToolMappHist item whose
-- agent has a current Agent item (in agent_catalog).
CREATE OR REPLACE VIEW agent_tool_analysis_source AS
SELECT SPLIT_PART(h."PK", '#', 1) AS userid,
       SPLIT_PART(h."PK", '#', 2) AS sessionid,
       SPLIT_PART(h."SK", '#', 1) AS processid,
       a.domainid,
       SPLIT_PART(h."SK", '#', 2) AS agentid,
       SPLIT_PART(h."SK", '#', 3) AS toolid,
       h."value"."ToolNM"."S"::VARCHAR AS toolnm,
       TO_DATE(LEFT(h."value"."TransactDT"."S"::VARCHAR, 8), 'YYYYMMDD') AS execution_date,
       TO_TIMESTAMP(h."value"."TransactDT"."S"::VARCHAR, 'YYYYMMDDHH24MISS')::TIMESTAMP AS execution_datetime,
       h."value"."SuccYN"."S"::VARCHAR = 'Y' AS success_flag,
       h."value"."ToolValues"."S"::VARCHAR AS tool_values,
       h."value"."ResultMsg"."S"::VARCHAR AS result_message,
       GETDATE() AS load_timestamp
FROM "AgentTable" h
JOIN agent_catalog a ON a.agentid = SPLIT_PART(h."SK", '#', 2)
WHERE h."value"."EntityType"."S"::VARCHAR = 'UserSessPrcToolMappHist';

-- agent_score_summary without the today-dependent columns (25_today.sql sets them). An
-- agent execution is all staging rows of one (user, session, domain, agent); it succeeds
-- only if every row did; its date is the latest row date.
CREATE OR REPLACE VIEW agent_score_figures AS
WITH agent_executions AS (
    SELECT userid, sessionid, domainid, agentid,
           BOOL_AND(success_flag) AS success, MAX(execution_date) AS execution_date
    FROM agent_tool_analysis_staging
    GROUP BY userid, sessionid, domainid, agentid
), totals AS (
    SELECT domainid, agentid, COUNT(*) AS total_executions,
           SUM(CASE WHEN success THEN 1 ELSE 0 END) AS success_count,
           MAX(execution_date) AS last_execution_date
    FROM agent_executions
    GROUP BY domainid, agentid
)
SELECT t.domainid, t.agentid, c.agentnm, t.total_executions, t.success_count,
       t.total_executions - t.success_count AS failure_count,
       t.success_count::DOUBLE PRECISION / t.total_executions AS success_rate,
       t.last_execution_date
FROM totals t
JOIN agent_catalog c ON c.agentid = t.agentid;

-- user_process_patterns without pattern_score and is_recommended (25_today.sql). A run is
-- one (user, agent, session); its pattern orders rows by execution_datetime, then
-- processid, then toolid.
CREATE OR REPLACE VIEW user_pattern_figures AS
WITH runs AS (
    SELECT userid, agentid, sessionid,
           LISTAGG(processid, '->') WITHIN GROUP (ORDER BY execution_datetime, processid, toolid) AS process_pattern,
           LISTAGG(toolnm, '->') WITHIN GROUP (ORDER BY execution_datetime, processid, toolid) AS tool_sequence,
           BOOL_AND(success_flag) AS success,
           MIN(execution_date) AS first_date, MAX(execution_date) AS last_date
    FROM agent_tool_analysis_staging
    GROUP BY userid, agentid, sessionid
)
SELECT userid, process_pattern, agentid AS agent_sequence, tool_sequence,
       COUNT(*) AS execution_count, SUM(CASE WHEN success THEN 1 ELSE 0 END) AS success_count,
       MIN(first_date) AS first_used_date, MAX(last_date) AS last_used_date
FROM runs
GROUP BY userid, process_pattern, agentid, tool_sequence;

-- The seed's tool-error query: per agent, rows, failed rows and the distinct failed tools.
CREATE OR REPLACE VIEW agent_tool_error_figures AS
WITH agent_totals AS (
    SELECT agentid, COUNT(*) AS total_executions
    FROM agent_tool_analysis_staging
    GROUP BY agentid
), agent_errors AS (
    SELECT agentid, COUNT(*) AS total_errors,
           LISTAGG(DISTINCT toolnm, ', ') WITHIN GROUP (ORDER BY toolnm) AS failed_tools
    FROM agent_tool_analysis_staging
    WHERE success_flag = FALSE
    GROUP BY agentid
)
SELECT t.agentid, c.agentnm AS agent_name, t.total_executions, e.total_errors,
       e.total_errors::DOUBLE PRECISION / t.total_executions AS error_rate, e.failed_tools
FROM agent_totals t
JOIN agent_errors e ON e.agentid = t.agentid
JOIN agent_catalog c ON c.agentid = t.agentid;
