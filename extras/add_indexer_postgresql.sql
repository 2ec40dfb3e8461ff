-- DICOM Indexer: the whole database footprint in a dcm4chee 2.x database on
-- PostgreSQL (9.6 and later).
--
--   psql -d pacsdb -f extras/add_indexer_postgresql.sql
--
-- Adds one table, study_service, and one function, indexer_process(), in the
-- schema where dcm4chee's tables are (the first of the search_path). It
-- touches none of dcm4chee's own tables: no trigger, no column, no index.
-- Safe to run again over itself: the queue and its position are kept.
-- The same behaviour as extras/add_indexer.sql (MySQL), which explains it at
-- more length.

-- One row per study the indexer knows of, plus bookkeeping rows with
-- study_pk < 1 (dcm4chee's pks start at 1):
--   0  'cursor'    where indexer_process resumes: study_updated_time is the
--                  updated_time watermark, cursor_pk the highest study pk seen,
--                  enqueued_at when it was last called.
--   -1 'initial'   an unfinished `client.py initial`.
--   -2 'reconcile' an unfinished `client.py reconcile`.
CREATE TABLE IF NOT EXISTS study_service (
  study_pk BIGINT NOT NULL PRIMARY KEY,
  status VARCHAR(16) NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  last_error VARCHAR(255),
  study_updated_time TIMESTAMP,
  study_version BYTEA,
  sent_version BYTEA,
  enqueued_at TIMESTAMP,
  sent_at TIMESTAMP,
  study_iuid TEXT,
  cursor_pk BIGINT,
  next_attempt_at TIMESTAMP
);
-- Added in 2.2, to a table an earlier version installed.
ALTER TABLE study_service ADD COLUMN IF NOT EXISTS next_attempt_at TIMESTAMP;
CREATE INDEX IF NOT EXISTS study_service_status ON study_service (status, study_pk);
COMMENT ON TABLE study_service IS
  'DICOM Indexer: studies to register with the central index, and what it acknowledged';
COMMENT ON COLUMN study_service.status IS
  'pending, sent, failed, deleting, deleted; other values on bookkeeping rows';
COMMENT ON COLUMN study_service.study_version IS
  'MD5 of the study row when last enqueued';
COMMENT ON COLUMN study_service.sent_version IS
  'MD5 of the JSON document last acknowledged by the service';
COMMENT ON COLUMN study_service.next_attempt_at IS
  'pending after a failure: not tried again before this';

-- The cursor starts at installation time: studies stored from now on are
-- enqueued by indexer_process; `client.py initial` sends the older ones.
INSERT INTO study_service (study_pk, status, study_updated_time, cursor_pk, enqueued_at)
SELECT 0, 'cursor', LOCALTIMESTAMP(0), COALESCE(MAX(pk), 0), LOCALTIMESTAMP FROM study
ON CONFLICT (study_pk) DO NOTHING;

-- Enqueues (status 'pending') every study created or changed since the last
-- call, reading only those rows, and returns how many it enqueued.
--
-- It reads only the columns of study that the indexer's role may read
-- (extras/grant_indexer_postgresql.sql) and writes only study_service, with
-- the caller's rights: see the search_path pinned below.
--
-- dcm4chee's application server stamps updated_time inside its transaction,
-- in its local time: a row can become visible with an updated_time below rows
-- already seen. Each call re-reads a safety window (300 s) behind the later
-- of the watermark and the previous call, compares a version of each row
-- read (updated_time has no more than the JVM's precision, and two rewrites
-- within it share it but not their counts), caps the watermark at now (a
-- study stamped in the future cannot hide others), and reads with plain
-- MVCC reads: no lock that dcm4chee's writes would wait for.
--
-- Without an index on study(updated_time) (dropped by a DBA, or never
-- created), rows cannot be found by time without scanning the table: each
-- call then looks only at the newest recent_rows studies by primary key, and
-- `client.py reconcile` finds changes to older ones. `client.py check` says
-- which way this database is read.
BEGIN;
CREATE OR REPLACE FUNCTION indexer_process() RETURNS INTEGER
LANGUAGE plpgsql
SECURITY INVOKER
-- Every statement below finds its rows through an index, whatever the
-- planner would guess. Its guess comes from statistics, which lag (ANALYZE
-- ran during a burst of rewrites, or never), and after five calls in one
-- session PL/pgSQL may switch to a generic plan that knows none of the
-- values: either way it chose to read all of study and study_service by
-- hash joins. Priced this way, an index read and a nested loop by primary
-- key are the only paths it can afford, on 9.6 as on 17 (plan_cache_mode
-- exists only from 12). Plain index scans, not bitmap or index-only ones:
-- only they mark the entries of dead rows (each rewrite leaves one until
-- VACUUM) so that the next call skips them. The settings hold inside this
-- function only.
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_bitmapscan = off
SET enable_indexonlyscan = off
AS $$
DECLARE
  safety_window INTERVAL := INTERVAL '300 seconds';
  recent_rows BIGINT := 5000;
  now_time TIMESTAMP := LOCALTIMESTAMP;
  last_call TIMESTAMP;
  watermark TIMESTAMP;
  highest_pk BIGINT;
  scan_from_time TIMESTAMP;
  scan_from_pk BIGINT;
  has_time_index BOOLEAN;
  enqueued INTEGER;
  newest_updated TIMESTAMP;
  newest_pk BIGINT;
BEGIN
  -- FOR UPDATE serialises two calls at once (two servers on one database).
  SELECT study_updated_time, cursor_pk, enqueued_at INTO watermark, highest_pk, last_call
    FROM study_service WHERE study_pk = 0 FOR UPDATE;
  IF watermark IS NULL THEN
    -- The cursor row was removed by hand: start again from now.
    watermark := now_time;
    SELECT COALESCE(MAX(pk), 0) INTO highest_pk FROM study;
    INSERT INTO study_service (study_pk, status, enqueued_at) VALUES (0, 'cursor', now_time)
    ON CONFLICT (study_pk) DO UPDATE SET status = 'cursor';
  END IF;
  highest_pk := COALESCE(highest_pk, 0);
  scan_from_time := GREATEST(LEAST(watermark, now_time), COALESCE(last_call, watermark))
                    - safety_window;
  has_time_index := EXISTS (
    SELECT 1 FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
     WHERE i.indrelid = 'study'::regclass AND a.attname = 'updated_time');
  scan_from_pk := CASE WHEN has_time_index THEN highest_pk
                       ELSE GREATEST(highest_pk - recent_rows, 0) END;

  WITH touched AS (
    -- With the index: the rows stamped since scan_from_time, and the new
    -- rows past the highest pk seen, whatever their updated_time says.
    SELECT pk FROM study WHERE has_time_index AND updated_time >= scan_from_time
    UNION
    SELECT pk FROM study
     WHERE pk > scan_from_pk
       AND (has_time_index OR updated_time >= scan_from_time OR pk > highest_pk)
  ), changed AS (
    -- Must stay the same expression as PostgreSQLStatements.STUDY_VERSION in
    -- client.py: a study enqueued by `initial` is not enqueued again here.
    SELECT s.pk, s.updated_time,
           decode(md5(concat_ws('|', to_char(s.updated_time, 'YYYY-MM-DD HH24:MI:SS.US'),
               s.num_series, s.num_instances, COALESCE(s.mods_in_study, ''),
               COALESCE(s.patient_fk::text, ''), s.study_iuid,
               COALESCE(to_char(s.study_datetime, 'YYYY-MM-DD HH24:MI:SS.US'), ''),
               COALESCE(s.study_desc, ''))), 'hex') AS version,
           s.study_iuid
      FROM touched JOIN study s ON s.pk = touched.pk
  ), enqueued_rows AS (
    -- study_iuid from the moment a study is enqueued: a POST may reach the
    -- service and its answer be lost; if the study is then deleted, its
    -- DELETE needs the UID, which no acknowledgement recorded.
    INSERT INTO study_service AS q
      (study_pk, status, attempts, last_error, study_updated_time, study_version, enqueued_at,
       study_iuid)
    SELECT c.pk, 'pending', 0, NULL, c.updated_time, c.version, now_time, c.study_iuid
      FROM changed c LEFT JOIN study_service known ON known.study_pk = c.pk
     WHERE known.study_version IS DISTINCT FROM c.version
    ON CONFLICT (study_pk) DO UPDATE SET
      status = 'pending', attempts = 0, last_error = NULL, next_attempt_at = NULL,
      study_updated_time = EXCLUDED.study_updated_time,
      study_version = EXCLUDED.study_version, enqueued_at = EXCLUDED.enqueued_at,
      study_iuid = EXCLUDED.study_iuid
    RETURNING q.study_pk, q.study_updated_time
  )
  SELECT COUNT(*),
         MAX(study_updated_time) FILTER (WHERE study_updated_time <= now_time),
         MAX(study_pk)
    INTO enqueued, newest_updated, newest_pk
    FROM enqueued_rows;

  UPDATE study_service
     SET study_updated_time = GREATEST(watermark, newest_updated),
         cursor_pk = GREATEST(highest_pk, newest_pk),
         enqueued_at = now_time
   WHERE study_pk = 0;
  RETURN enqueued;
END
$$;

-- The function runs with the caller's rights (SECURITY INVOKER): it can do
-- nothing the indexer's role could not do by itself, and a definer function
-- would run as whoever installed it (often a superuser). Its search_path is
-- pinned all the same, to the schema of the archive's tables first and
-- pg_temp last, so that no temporary table or function the caller creates
-- can stand in for study or study_service. In one transaction with CREATE OR
-- REPLACE, so the function is never seen without it; running this script
-- again fixes a site installed by an older version (SECURITY DEFINER with
-- the installer's search_path, where pg_temp came first).
DO $pin$
BEGIN
  EXECUTE format('ALTER FUNCTION indexer_process() SET search_path = %I, pg_temp',
                 current_schema());
END
$pin$;

-- PostgreSQL lets every role execute a new function: only the indexer's role
-- (extras/grant_indexer_postgresql.sql) should. CREATE OR REPLACE keeps the
-- grants, so running this script again keeps that role's EXECUTE.
REVOKE EXECUTE ON FUNCTION indexer_process() FROM PUBLIC;
COMMIT;
