-- The SUPER-to-staging transform, in full: the agent catalog from Agent METADATA items,
-- then the staging table (views in 00_schema.sql).
--
-- Needs: 00_schema.sql, and the session settings it names. DELETE rather than TRUNCATE:
-- TRUNCATE commits in Redshift, and `toolrank warehouse score` runs a file as one
-- transaction (BatchExecuteStatement), so readers see the old tables or the new ones,
-- never a half-built one.

DELETE FROM agent_catalog;
INSERT INTO agent_catalog SELECT * FROM agent_catalog_source;

DELETE FROM agent_tool_analysis_staging;
INSERT INTO agent_tool_analysis_staging SELECT * FROM agent_tool_analysis_source;
