-- DICOM Indexer: a dedicated PostgreSQL role with only what the client needs,
-- in a dcm4chee-arc-light 5 database (5.23 to 5.35).
--
-- Run it in the archive's database after
-- extras/add_indexer_arclight5_postgresql.sql, as the owner of arc-light's
-- tables (or a superuser), naming the password:
--
--   psql -d pacsdb -v indexer_password='a-long-random-password' \
--        -f /srv/dicom_indexer/extras/grant_indexer_arclight5_postgresql.sql
--
-- Optionally -v indexer_role=dicom_indexer (the default). Safe to run again:
-- it sets the password and grants again. PostgreSQL 9.6 and later.
--
-- What the role gets, and why:
--   CONNECT on the database and USAGE on the schema, to reach the tables
--   SELECT on the study columns the documents and versions are made of
--   SELECT on the columns that lead to the patient's ID and name (patient,
--   patient_id, person_name) and on the study's counts (study_query_attrs)
--   SELECT, INSERT, UPDATE, DELETE on study_service, the indexer's own table
--   EXECUTE on indexer_process(), which runs with this role's own rights
--   (SECURITY INVOKER): it can do nothing the grants above do not allow
-- Nothing else: no write on any table of dcm4chee.

\set ON_ERROR_STOP on
\if :{?indexer_password}
\else
  \echo 'set the password first: psql -v indexer_password=... -f grant_indexer_arclight5_postgresql.sql'
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
SELECT format('GRANT SELECT (pk, patient_fk, study_iuid, study_date, study_time, study_desc,'
              ' updated_time, access_time, version, rejection_state, study_size) ON study TO %I',
              :'indexer_role') \gexec
SELECT format('GRANT SELECT (pk, study_fk, view_id, num_series, num_instances, mods_in_study)'
              ' ON study_query_attrs TO %I', :'indexer_role') \gexec
SELECT format('GRANT SELECT (pk, alphabetic_name, ideographic_name, phonetic_name) ON person_name TO %I', :'indexer_role') \gexec
-- 5.31 and later: a patient has one or more patient_id rows (patient_fk);
-- before, patient.patient_id_fk names its one row.
SELECT format('GRANT SELECT (pk, pat_name_fk) ON patient TO %I', :'indexer_role') \gexec
SELECT format('GRANT SELECT (patient_fk) ON patient_id TO %I', :'indexer_role')
 WHERE EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                  AND table_name = 'patient_id' AND column_name = 'patient_fk') \gexec
SELECT format('GRANT SELECT (pk, pat_id) ON patient_id TO %I', :'indexer_role') \gexec
SELECT format('GRANT SELECT (patient_id_fk) ON patient TO %I', :'indexer_role')
 WHERE EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                  AND table_name = 'patient' AND column_name = 'patient_id_fk') \gexec
SELECT format('GRANT SELECT, INSERT, UPDATE, DELETE ON study_service TO %I',
              :'indexer_role') \gexec
SELECT format('GRANT EXECUTE ON FUNCTION indexer_process() TO %I', :'indexer_role') \gexec
