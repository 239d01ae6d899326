// A small app on node-postgres (`npm install pg`) against a Hyperdrive config (or any PostgreSQL).
//
//   DATABASE_URL="$(hd hyperdrive get my-db --connection-string)" node examples/node_postgres_app.mjs
//   node examples/node_postgres_app.mjs postgresql://…      # or the URL as the argument
//
// TLS: the connection string says `sslmode=verify-full&sslrootcert=<the edge's CA>`, and
// node-postgres reads both from the URL: it verifies the edge's certificate and host name. Pass the
// string as it is; do not add `ssl: { rejectUnauthorized: false }`, which turns verification off.
import pg from 'pg'

const url = process.argv[2] || process.env.DATABASE_URL
if (!url) {
  console.error('usage: node node_postgres_app.mjs DATABASE_URL (or set DATABASE_URL)')
  process.exit(2)
}
const pool = new pg.Pool({
  connectionString: url,
  max: 4,
  connectionTimeoutMillis: 15000
})

try {
  const { rows: [{ server_version: version }] } = await pool.query('show server_version')
  console.log(`connected to PostgreSQL ${version}`)
  const { rows: [{ sum }] } = await pool.query('select $1::int + $2::int as sum', [1, 1])
  console.log(`1 + 1 = ${sum}`)

  await pool.query(`create table if not exists notes (
                      id bigserial primary key,
                      body text not null,
                      created_at timestamptz not null default now())`)

  // A transaction that is rolled back leaves nothing behind (one client for the whole transaction).
  const client = await pool.connect()
  try {
    await client.query('begin')
    await client.query('insert into notes (body) values ($1)', ['never saved (node-postgres)'])
    await client.query('rollback')
  } finally {
    client.release()
  }
  const { rows: [{ n }] } = await pool.query('select count(*)::int as n from notes where body = $1', ['never saved (node-postgres)'])
  console.log(`rolled back: ${n} rows`)

  // A named (server-side) prepared statement, reused.
  const insert = { name: 'insert-note', text: 'insert into notes (body) values ($1) returning id' }
  const { rows: [{ id }] } = await pool.query({ ...insert, values: ['hello from node-postgres'] })
  const { rows: [{ total }] } = await pool.query('select count(*)::int as total from notes')
  console.log(`notes: ${total} in total, just added #${id}`)
  const { rows: latest } = await pool.query('select id, body from notes order by id desc limit 3')
  for (const row of latest) console.log(`  #${row.id}: ${row.body}`)
} finally {
  await pool.end()
}
