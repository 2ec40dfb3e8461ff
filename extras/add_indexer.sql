-- DICOM Indexer: the whole database footprint in a dcm4chee 2.x database.
--
--   mysql pacsdb < extras/add_indexer.sql
--
-- Adds one table, study_service, and one stored procedure, indexer_process.
-- It touches none of dcm4chee's own tables: no trigger, no column, no index.
-- Safe to run again over itself, and over the original client's install
-- (trigger indexer_process + study_service(study_pk INT PRIMARY KEY)): the
-- trigger is dropped and the studies it left in study_service stay pending.
-- Plain MySQL 5.6 syntax so that it installs on MySQL 5.6 to 8 and MariaDB 10.x.

-- The original client enqueued from a trigger inside dcm4chee's own INSERT;
-- the procedure below replaces it without running inside the PACS's writes.
DROP TRIGGER IF EXISTS indexer_process;

-- One row per study the indexer knows of, plus bookkeeping rows with
-- study_pk < 1 (dcm4chee's pks start at 1):
--   0  'cursor'  where indexer_process resumes: study_updated_time is the
--                updated_time watermark, cursor_pk the highest study pk seen,
--                enqueued_at when it was last called.
--   -1 'initial' an unfinished `client.py initial`: enqueued_at is when it
--                started, cursor_pk the last study pk it enqueued.
--   -2 'reconcile' an unfinished `client.py reconcile`: cursor_pk the last
--                study pk it checked.
CREATE TABLE IF NOT EXISTS study_service (
  study_pk BIGINT NOT NULL,
  PRIMARY KEY (study_pk)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- The columns are added apart from CREATE TABLE so that the original client's
-- table gets them too. MySQL has no ADD COLUMN IF NOT EXISTS, hence the check
-- on information_schema and a prepared statement.
SET @indexer_ddl = IF(
  (SELECT COUNT(*) FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study_service'
      AND COLUMN_NAME = 'status') = 0,
  'ALTER TABLE study_service
     MODIFY study_pk BIGINT NOT NULL,
     ADD COLUMN status VARCHAR(16) CHARACTER SET ascii NOT NULL DEFAULT ''pending''
       COMMENT ''pending, sent, failed, deleting, deleted; other values on bookkeeping rows'',
     ADD COLUMN attempts INT NOT NULL DEFAULT 0
       COMMENT ''delivery attempts since the study was last enqueued'',
     ADD COLUMN last_error VARCHAR(255) CHARACTER SET utf8mb4 NULL
       COMMENT ''why the last attempt failed; never patient data'',
     ADD COLUMN study_updated_time DATETIME NULL
       COMMENT ''study.updated_time when last enqueued'',
     ADD COLUMN study_version BINARY(16) NULL
       COMMENT ''MD5 of the study row when last enqueued (binary: no collation)'',
     ADD COLUMN sent_version BINARY(16) NULL
       COMMENT ''MD5 of the JSON document last acknowledged by the service'',
     ADD COLUMN enqueued_at DATETIME(6) NULL,
     ADD COLUMN sent_at DATETIME(6) NULL
       COMMENT ''when the service last answered 2xx for this study'',
     ADD COLUMN study_iuid VARCHAR(250) CHARACTER SET utf8mb4 NULL
       COMMENT ''the UID last acknowledged: a DELETE needs it once the study row is gone'',
     ADD COLUMN cursor_pk BIGINT NULL
       COMMENT ''bookkeeping rows only: a study pk position'',
     ADD INDEX study_service_status (status, study_pk)',
  'DO 0');
PREPARE indexer_ddl FROM @indexer_ddl;
EXECUTE indexer_ddl;
DEALLOCATE PREPARE indexer_ddl;

-- Added in 2.2, to a table an earlier version installed: when a study that
-- failed is tried again (a study's trouble is that study's: the others go on).
SET @indexer_ddl = IF(
  (SELECT COUNT(*) FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study_service'
      AND COLUMN_NAME = 'next_attempt_at') = 0,
  'ALTER TABLE study_service ADD COLUMN next_attempt_at DATETIME(6) NULL
     COMMENT ''pending after a failure: not tried again before this''',
  'DO 0');
PREPARE indexer_ddl FROM @indexer_ddl;
EXECUTE indexer_ddl;
DEALLOCATE PREPARE indexer_ddl;

-- The cursor starts at installation time: studies stored from now on are
-- enqueued by indexer_process; `client.py initial` sends the older ones.
-- INSERT IGNORE keeps the position of an existing install.
SET @indexer_max_pk = (SELECT IFNULL(MAX(pk), 0) FROM study);
INSERT IGNORE INTO study_service
  (study_pk, status, study_updated_time, cursor_pk, enqueued_at)
VALUES (0, 'cursor', NOW(), @indexer_max_pk, NOW());

-- Dropping the procedure drops the EXECUTE granted on it (grant_indexer.sql):
-- remember who had it, to grant it again below.
SET @indexer_grantees = (
  SELECT GROUP_CONCAT(CONCAT(QUOTE(User), '@', QUOTE(Host)))
    FROM mysql.procs_priv
   WHERE Db = DATABASE() AND Routine_name = 'indexer_process'
     AND Routine_type = 'PROCEDURE');

DROP PROCEDURE IF EXISTS indexer_process;

DELIMITER //

-- Enqueues (status 'pending') every study created or changed since the last
-- call, reading only those rows: a range of the study_updated index and of
-- the primary key. A study is changed when its row differs from the version
-- recorded at its last enqueue, so re-reading a row costs nothing but the read.
-- Returns one row: enqueued = how many studies it enqueued.
-- SQL SECURITY INVOKER: the procedure runs with the rights of the account that
-- calls it, never with those of whoever installed it (often root), so calling
-- it gains the indexer's account nothing it was not granted. (It reads only
-- the columns of study that grant_indexer*.sql grants and writes only
-- study_service.) A temporary table the caller made could shadow study or
-- study_service inside it, but only for that caller's own session and with
-- that caller's own rights; the indexer's account is not granted CREATE
-- TEMPORARY TABLES anyway.
CREATE PROCEDURE indexer_process()
  SQL SECURITY INVOKER
  MODIFIES SQL DATA
  COMMENT 'DICOM Indexer: enqueue new and changed studies into study_service'
BEGIN
  -- dcm4chee sets updated_time inside its transaction, not at commit, so a
  -- row can become visible with an updated_time below rows already seen.
  -- Each call re-reads this many seconds: longer than any dcm4chee
  -- transaction plus the drift between the PACS's and the database's clocks.
  DECLARE safety_window_seconds INT DEFAULT 300;
  -- Without dcm4chee's study_updated index (dropped by a DBA, or renamed),
  -- rewrites cannot be found by time without scanning the table: each call
  -- re-reads this many of the newest studies by primary key instead (where
  -- series keep arriving), and `client.py reconcile` finds older rewrites.
  -- `client.py check` reports which way this database is read.
  DECLARE recent_rows INT DEFAULT 5000;
  DECLARE has_time_index INT DEFAULT 0;
  DECLARE last_call DATETIME DEFAULT NULL;
  DECLARE now_time DATETIME DEFAULT NOW();
  DECLARE watermark DATETIME DEFAULT NULL;
  DECLARE highest_pk BIGINT DEFAULT NULL;
  DECLARE scan_from_time DATETIME;
  DECLARE scan_from_pk BIGINT;
  DECLARE row_pk BIGINT;
  DECLARE row_updated DATETIME;
  DECLARE row_version BINARY(16);
  DECLARE known_version BINARY(16);
  DECLARE row_iuid VARCHAR(250) CHARACTER SET utf8mb4;
  DECLARE enqueued INT DEFAULT 0;
  DECLARE done INT DEFAULT 0;
  -- A zero updated_time ('0000-00-00', from years of a permissive sql_mode)
  -- is read as NULL: under a strict sql_mode, fetching it into a DATETIME
  -- variable fails, and every call with it.
  -- Plain (non-locking) reads of study, so dcm4chee's writes never wait on
  -- this procedure. The version covers every study column the document
  -- carries plus updated_time: updated_time has second precision, and two
  -- rewrites within one second share it but not their counts.
  DECLARE changed_studies CURSOR FOR
    -- STRAIGHT_JOIN and the forced indexes keep the plan O(changes) whatever
    -- the statistics say (after a burst of rewrites they lag): the few
    -- touched pks first, then each study and queue row by primary key.
    SELECT STRAIGHT_JOIN s.pk, IF(s.updated_time >= '1000-01-01', s.updated_time, NULL),
           UNHEX(MD5(CONCAT_WS('|', s.updated_time, s.num_series,
               s.num_instances, IFNULL(s.mods_in_study, ''),
               IFNULL(s.patient_fk, ''), s.study_iuid,
               IFNULL(s.study_datetime, ''),
               IFNULL(s.study_desc, '')))) AS version,
           q.study_version AS enqueued_version, s.study_iuid
      FROM (SELECT pk FROM study FORCE INDEX (study_updated)
             WHERE updated_time >= scan_from_time
            UNION
            -- new rows past the highest pk seen, whatever their
            -- updated_time says
            SELECT pk FROM study FORCE INDEX (PRIMARY)
             WHERE pk > scan_from_pk) touched
      JOIN study s ON s.pk = touched.pk
      LEFT JOIN study_service q ON q.study_pk = s.pk
    HAVING NOT (enqueued_version <=> version);
  -- The same rows and version, for a study table without study_updated, but
  -- looked for among the newest studies only, by primary key. (A cursor
  -- naming a missing index fails only when opened, so both can be declared.)
  DECLARE recent_studies CURSOR FOR
    SELECT STRAIGHT_JOIN s.pk, IF(s.updated_time >= '1000-01-01', s.updated_time, NULL),
           UNHEX(MD5(CONCAT_WS('|', s.updated_time, s.num_series,
               s.num_instances, IFNULL(s.mods_in_study, ''),
               IFNULL(s.patient_fk, ''), s.study_iuid,
               IFNULL(s.study_datetime, ''),
               IFNULL(s.study_desc, '')))) AS version,
           q.study_version AS enqueued_version, s.study_iuid
      FROM study s FORCE INDEX (PRIMARY)
      LEFT JOIN study_service q ON q.study_pk = s.pk
     WHERE s.pk > scan_from_pk
       AND (s.updated_time >= scan_from_time OR s.pk > highest_pk)
    HAVING NOT (enqueued_version <=> version);
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1;

  SELECT COUNT(*) INTO has_time_index FROM information_schema.STATISTICS
   WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study'
     AND INDEX_NAME = 'study_updated' AND SEQ_IN_INDEX = 1
     AND COLUMN_NAME = 'updated_time';

  START TRANSACTION;
  -- FOR UPDATE serialises two calls at once (two servers on one database).
  SELECT study_updated_time, cursor_pk, enqueued_at INTO watermark, highest_pk, last_call
    FROM study_service WHERE study_pk = 0 FOR UPDATE;
  SET done = 0;
  IF watermark IS NULL THEN
    -- The cursor row was removed by hand: start again from now.
    SET watermark = now_time;
    SELECT IFNULL(MAX(pk), 0) INTO highest_pk FROM study;
    INSERT INTO study_service (study_pk, status, enqueued_at)
    VALUES (0, 'cursor', now_time)
    ON DUPLICATE KEY UPDATE status = 'cursor';
  END IF;
  IF highest_pk IS NULL THEN
    SET highest_pk = 0;
  END IF;
  -- Two bounds, each enough alone, and the later one is read from:
  --  * the watermark (highest updated_time seen): a row committed late was
  --    stamped at most a transaction's length before rows already seen. It is
  --    never ahead of the clock: one study stamped in the future (a PACS clock
  --    once set wrong) is re-read on each call, a single row, but cannot hide
  --    the changes of other studies behind it.
  --  * the previous call: a row not visible to it was stamped at most a
  --    transaction's length before it. This one keeps a quiet PACS from
  --    re-reading its last burst of changes on every call.
  SET scan_from_time = GREATEST(LEAST(watermark, now_time), IFNULL(last_call, watermark))
                       - INTERVAL safety_window_seconds SECOND;
  SET scan_from_pk = highest_pk;

  IF has_time_index THEN
    OPEN changed_studies;
  ELSE
    SET scan_from_pk = GREATEST(highest_pk - recent_rows, 0);
    OPEN recent_studies;
  END IF;
  read_loop: LOOP
    IF has_time_index THEN
      FETCH changed_studies INTO row_pk, row_updated, row_version, known_version, row_iuid;
    ELSE
      FETCH recent_studies INTO row_pk, row_updated, row_version, known_version, row_iuid;
    END IF;
    IF done THEN
      LEAVE read_loop;
    END IF;
    -- study_iuid from the moment a study is enqueued: a POST may reach the
    -- service and its answer be lost (a cut, a crash); if the study is then
    -- deleted, its DELETE needs the UID, which no acknowledgement recorded.
    INSERT INTO study_service
      (study_pk, status, attempts, last_error, study_updated_time,
       study_version, enqueued_at, study_iuid)
    VALUES (row_pk, 'pending', 0, NULL, row_updated, row_version, now_time, row_iuid)
    ON DUPLICATE KEY UPDATE
      status = 'pending', attempts = 0, last_error = NULL, next_attempt_at = NULL,
      study_updated_time = row_updated, study_version = row_version,
      enqueued_at = now_time, study_iuid = row_iuid;
    SET enqueued = enqueued + 1;
    IF row_updated > watermark AND row_updated <= now_time THEN
      SET watermark = row_updated;
    END IF;
    IF row_pk > highest_pk THEN
      SET highest_pk = row_pk;
    END IF;
  END LOOP;
  IF has_time_index THEN
    CLOSE changed_studies;
  ELSE
    CLOSE recent_studies;
  END IF;

  UPDATE study_service
     SET study_updated_time = watermark, cursor_pk = highest_pk, enqueued_at = now_time
   WHERE study_pk = 0;
  COMMIT;
  SELECT enqueued;
END//

DELIMITER ;

SET @indexer_sql = IF(@indexer_grantees IS NULL, 'DO 0',
  CONCAT('GRANT EXECUTE ON PROCEDURE indexer_process TO ', @indexer_grantees));
PREPARE indexer_grant FROM @indexer_sql;
EXECUTE indexer_grant;
DEALLOCATE PREPARE indexer_grant;
