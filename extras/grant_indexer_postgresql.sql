-- DICOM Indexer: a dedicated PostgreSQL role with only what the client needs.
--
-- Run it in the PACS database after extras/add_indexer_postgresql.sql, as the
-- owner of dcm4chee's tables (or a superuser), naming the password:
--
--   psql -d pacsdb -v indexer_password='a-long-random-password' \
--        -f /srv/dicom_indexer/extras/grant_indexer_postgresql.sql
--
-- Optionally -v indexer_role=dicom_indexer (the default). Safe to run again:
-- it sets the password and grants again. PostgreSQL 9.6 and later.
--
-- What the role gets, and why:
--   CONNECT on the database and USAGE on the schema, to reach the tables
--   SELECT on the study columns the documents and versions are made of
--   SELECT on patient pk, pat_id and pat_name (never the other columns)
--   SELECT, INSERT, UPDATE, DELETE on study_service, the indexer's own table
--   EXECUTE on indexer_process(), which runs with this role's own rights
--   (SECURITY INVOKER): it can do nothing the grants above do not allow
-- Nothing else: no write on any table of dcm4chee.

\set ON_ERROR_STOP on
\if :{?indexer_password}
\else
  \echo 'set the password first: psql -v indexer_password=... -f grant_indexer_postgresql.sql'
  \quit
\endif
\if :{?indexer_role}
\else
  \set indexer_role dicom_indexer
\endif

SELECT format('CREATE ROLE %I LOGIN', :'indexer_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'indexer_role') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'indexer_role', :'indexer_password') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'indexer_role') \gexec
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), :'indexer_role') \gexec
SELECT format('GRANT SELECT (pk, patient_fk, study_iuid, study_datetime, study_desc,'
              ' mods_in_study, num_series, num_instances, updated_time) ON study TO %I',
              :'indexer_role') \gexec
SELECT format('GRANT SELECT (pk, pat_id, pat_name) ON patient TO %I', :'indexer_role') \gexec
SELECT format('GRANT SELECT, INSERT, UPDATE, DELETE ON study_service TO %I',
              :'indexer_role') \gexec
SELECT format('GRANT EXECUTE ON FUNCTION indexer_process() TO %I', :'indexer_role') \gexec
