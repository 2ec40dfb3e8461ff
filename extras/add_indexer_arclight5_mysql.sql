-- DICOM Indexer: the whole database footprint in a dcm4chee-arc-light 5
-- database on MySQL or MariaDB (arc-light 5.23 to 5.35).
--
--   mysql pacsdb < extras/add_indexer_arclight5_mysql.sql
--
-- Adds one table, study_service, and one stored procedure, indexer_process.
-- It touches none of arc-light's own tables: no trigger, no column, no index.
-- Safe to run again over itself, and to run again after an arc-light upgrade
-- (its update scripts alter only arc-light's own tables).
-- For dcm4chee 2.x, use extras/add_indexer.sql instead.

-- One row per study the indexer knows of, plus bookkeeping rows with
-- study_pk < 1 (arc-light's pks start at 1): 0 'cursor' (where
-- indexer_process resumes), -1 'initial' and -2 'reconcile' (unfinished
-- commands). The same table as for dcm4chee 2.x (extras/add_indexer.sql
-- explains each column), with microseconds in study_updated_time, as
-- arc-light's timestamps have.
CREATE TABLE IF NOT EXISTS study_service (
  study_pk BIGINT NOT NULL,
  status VARCHAR(16) CHARACTER SET ascii NOT NULL DEFAULT 'pending'
    COMMENT 'pending, sent, failed, deleting, deleted; other values on bookkeeping rows',
  attempts INT NOT NULL DEFAULT 0,
  last_error VARCHAR(255) CHARACTER SET utf8mb4 NULL
    COMMENT 'why the last attempt failed; never patient data',
  study_updated_time DATETIME(6) NULL COMMENT 'study.updated_time when last enqueued',
  study_version BINARY(16) NULL COMMENT 'MD5 of the study row when last enqueued',
  sent_version BINARY(16) NULL
    COMMENT 'MD5 of the JSON document last acknowledged by the service',
  enqueued_at DATETIME(6) NULL,
  sent_at DATETIME(6) NULL,
  study_iuid VARCHAR(255) CHARACTER SET utf8mb4 NULL,
  cursor_pk BIGINT NULL COMMENT 'bookkeeping rows only: a study pk position',
  next_attempt_at DATETIME(6) NULL
    COMMENT 'pending after a failure: not tried again before this',
  PRIMARY KEY (study_pk),
  INDEX study_service_status (status, study_pk)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

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
SET @indexer_max_pk = (SELECT IFNULL(MAX(pk), 0) FROM study);
INSERT IGNORE INTO study_service
  (study_pk, status, study_updated_time, cursor_pk, enqueued_at)
VALUES (0, 'cursor', NOW(6), @indexer_max_pk, NOW(6));

-- Dropping the procedure drops the EXECUTE granted on it: remember who had
-- it, to grant it again below.
SET @indexer_grantees = (
  SELECT GROUP_CONCAT(CONCAT(QUOTE(User), '@', QUOTE(Host)))
    FROM mysql.procs_priv
   WHERE Db = DATABASE() AND Routine_name = 'indexer_process'
     AND Routine_type = 'PROCEDURE');

DROP PROCEDURE IF EXISTS indexer_process;

DELIMITER //

-- Enqueues every study created or changed since the last call, reading only
-- those rows, and returns how many it enqueued.
--
-- arc-light has no index on study.updated_time, but every update of a study
-- row sets access_time too, which only moves forward and is indexed:
-- access_time >= t AND updated_time >= t finds every study created or
-- updated since t through that index (its name depends on the install's
-- history, so it is not forced). The safety window, the watermark capped at
-- now and the plain reads are those of extras/add_indexer.sql.
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
  DECLARE safety_window_seconds INT DEFAULT 300;
  DECLARE last_call DATETIME(6) DEFAULT NULL;
  DECLARE now_time DATETIME(6) DEFAULT NOW(6);
  DECLARE watermark DATETIME(6) DEFAULT NULL;
  DECLARE highest_pk BIGINT DEFAULT NULL;
  DECLARE scan_from_time DATETIME(6);
  DECLARE row_pk BIGINT;
  DECLARE row_updated DATETIME(6);
  DECLARE row_version BINARY(16);
  DECLARE known_version BINARY(16);
  DECLARE row_iuid VARCHAR(255) CHARACTER SET utf8mb4;
  DECLARE enqueued INT DEFAULT 0;
  DECLARE done INT DEFAULT 0;
  -- Must stay the same expression as ArcLight5MySQLStatements.STUDY_VERSION
  -- in client.py: a study enqueued by `initial` is not enqueued again here.
  DECLARE changed_studies CURSOR FOR
    SELECT STRAIGHT_JOIN s.pk, s.updated_time,
           UNHEX(MD5(CONCAT_WS('|', DATE_FORMAT(s.updated_time, '%Y-%m-%d %H:%i:%s.%f'),
               IFNULL(s.version, ''), s.patient_fk, s.study_iuid, s.study_date,
               s.study_time, s.study_desc, s.rejection_state))) AS version,
           q.study_version AS enqueued_version, s.study_iuid
      FROM (SELECT pk FROM study
             WHERE access_time >= scan_from_time AND updated_time >= scan_from_time
            UNION
            SELECT pk FROM study FORCE INDEX (PRIMARY) WHERE pk > highest_pk) touched
      JOIN study s ON s.pk = touched.pk
      LEFT JOIN study_service q ON q.study_pk = s.pk
    HAVING NOT (enqueued_version <=> version);
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1;

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
  SET scan_from_time = GREATEST(LEAST(watermark, now_time), IFNULL(last_call, watermark))
                       - INTERVAL safety_window_seconds SECOND;

  OPEN changed_studies;
  read_loop: LOOP
    FETCH changed_studies INTO row_pk, row_updated, row_version, known_version, row_iuid;
    IF done THEN
      LEAVE read_loop;
    END IF;
    INSERT INTO study_service
      (study_pk, status, attempts, last_error, study_updated_time,
       study_version, enqueued_at, study_iuid)
    VALUES (row_pk, 'pending', 0, NULL, row_updated, row_version, now_time, row_iuid)
    ON DUPLICATE KEY UPDATE
      -- Withdrawn (complete rejection) and now back (the rejection revoked):
      -- sent again as new. Before status: MySQL assigns left to right.
      sent_version = IF(status IN ('deleted', 'deleting'), NULL, sent_version),
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
  CLOSE changed_studies;

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
