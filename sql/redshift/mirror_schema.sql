-- The tables of `toolrank mirror`, the Zero-ETL stand-in.
--
-- In Redshift the Zero-ETL integration creates "AgentTable" itself (in a read-only
-- destination database); toolrank creates it only where it is missing: a local warehouse,
-- or a database that toolrank feeds instead of Zero-ETL. Each mirror batch lands in
-- toolrank_mirror_batch and is applied with a join (delete the batch's keys, insert its
-- new images) in one transaction with the source positions it covers, so a restarted
-- mirror resumes exactly where its last batch committed.
--
-- Needs: enable_case_sensitive_identifier.

CREATE TABLE IF NOT EXISTS "AgentTable" (
    "PK"    VARCHAR(2048) NOT NULL,
    "SK"    VARCHAR(2048) NOT NULL,
    "value" SUPER
);

CREATE TABLE IF NOT EXISTS toolrank_mirror_batch (
    batch_id VARCHAR(64)   NOT NULL,
    "PK"     VARCHAR(2048) NOT NULL,
    "SK"     VARCHAR(2048) NOT NULL,
    "value"  SUPER
);

CREATE TABLE IF NOT EXISTS toolrank_mirror_positions (
    source   VARCHAR(1024) NOT NULL,
    part     VARCHAR(256)  NOT NULL,
    position VARCHAR(256)  NOT NULL
);
