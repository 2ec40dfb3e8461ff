-- DICOM Indexer: a dedicated MySQL user with only what the client needs, in
-- a dcm4chee-arc-light 5 database (5.23 to 5.35).
--
-- Run it in the archive's database after extras/add_indexer_arclight5_mysql.sql,
-- as an administrator, having chosen the password first:
--
--   $ mysql -u root -p pacsdb
--   mysql> SET @indexer_password = 'a-long-random-password';
--   mysql> SOURCE /srv/dicom_indexer/extras/grant_indexer_arclight5_mysql.sql
--
-- Optionally, before SOURCE: SET @indexer_user = 'dicom_indexer';
-- SET @indexer_host = 'localhost';  (the host the client connects from)
-- Safe to run again: it sets the password and grants again.
-- Needs MySQL 5.7.6+ or MariaDB 10.2+ (CREATE USER IF NOT EXISTS, ALTER USER);
-- on MySQL 5.6, create the user by hand and run only the GRANT statements.
--
-- What the user gets, and why:
--   SELECT on the study columns the documents and versions are made of
--   SELECT on the columns that lead to the patient's ID and name (patient,
--   patient_id, person_name) and on the study's counts (study_query_attrs)
--   SELECT, INSERT, UPDATE, DELETE on study_service, the indexer's own table
--   EXECUTE on indexer_process, which runs with this user's own rights
--   (SQL SECURITY INVOKER): it can do nothing the grants above do not allow
-- Nothing else: no dicomattrs, no write to any arc-light table.

SET @indexer_user = IFNULL(@indexer_user, 'dicom_indexer');
SET @indexer_host = IFNULL(@indexer_host, 'localhost');
SET @indexer_account = CONCAT(QUOTE(@indexer_user), '@', QUOTE(@indexer_host));

-- Without a password, stop here with an error that says so.
SET @indexer_sql = IF(IFNULL(@indexer_password, '') = '',
  'SELECT 1 FROM set_indexer_password_before_running_grant_indexer_sql',
  'DO 0');
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('CREATE USER IF NOT EXISTS ', @indexer_account);
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('ALTER USER ', @indexer_account, ' IDENTIFIED BY ',
                          QUOTE(@indexer_password));
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('GRANT SELECT (pk, patient_fk, study_iuid, study_date, study_time, study_desc, updated_time, access_time, version, rejection_state, study_size) ON study TO ', @indexer_account);
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('GRANT SELECT (pk, study_fk, view_id, num_series, num_instances, mods_in_study) ON study_query_attrs TO ', @indexer_account);
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('GRANT SELECT (pk, alphabetic_name, ideographic_name, phonetic_name) ON person_name TO ', @indexer_account);
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('GRANT SELECT (pk, pat_name_fk) ON patient TO ', @indexer_account);
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('GRANT SELECT (pk, pat_id) ON patient_id TO ', @indexer_account);
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

-- 5.31 and later: a patient has one or more patient_id rows (patient_fk);
-- before, patient.patient_id_fk names its one row.
SET @indexer_sql = IF(
  (SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()
      AND TABLE_NAME = 'patient_id' AND COLUMN_NAME = 'patient_fk') > 0,
  CONCAT('GRANT SELECT (patient_fk) ON patient_id TO ', @indexer_account),
  CONCAT('GRANT SELECT (patient_id_fk) ON patient TO ', @indexer_account));
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('GRANT SELECT, INSERT, UPDATE, DELETE ON study_service TO ',
                          @indexer_account);
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

SET @indexer_sql = CONCAT('GRANT EXECUTE ON PROCEDURE indexer_process TO ',
                          @indexer_account);
PREPARE indexer_stmt FROM @indexer_sql;
EXECUTE indexer_stmt;

DEALLOCATE PREPARE indexer_stmt;
SET @indexer_password = NULL;
