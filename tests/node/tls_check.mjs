// One connection through the edge and `SELECT 1`, for tests/e2e/test_edge_tls.py; one JSON line on
// stdout: {"ok": true, "value": 1} or {"ok": false, "code", "errno", "message"} (exit 0 either way).
//   node tls_check.mjs mysql2 URL [plaintext]   mysql2 as the README shows it: the URL's parts as
//                                               options, `ssl: { ca }` from its ssl-ca (no `ssl` at all
//                                               with "plaintext"), identity checked by Node
//   node tls_check.mjs postgres.js URL          Postgres.js with the connection string verbatim (the CA
//                                               comes from NODE_EXTRA_CA_CERTS, as the README says)
import { readFileSync } from 'node:fs'
import mysql from 'mysql2/promise'
import postgres from 'postgres'

const [driver, urlText, mode] = process.argv.slice(2)

async function viaMysql2 () {
  const url = new URL(urlText)
  const options = {
    host: url.hostname.replace(/^\[|\]$/g, ''),
    port: Number(url.port || 3306),
    user: decodeURIComponent(url.username),
    password: decodeURIComponent(url.password),
    database: decodeURIComponent(url.pathname.slice(1)),
    connectTimeout: 10000
  }
  if (mode !== 'plaintext') options.ssl = { ca: readFileSync(url.searchParams.get('ssl-ca')) }
  const c = await mysql.createConnection(options)
  try {
    const [[row]] = await c.query('SELECT 1 AS one')
    return row.one
  } finally {
    await c.end()
  }
}

async function viaPostgresjs () {
  const sql = postgres(urlText, { max: 1, connect_timeout: 10, onnotice: () => {} })
  try {
    const [row] = await sql`select 1 as one`
    return row.one
  } finally {
    await sql.end({ timeout: 5 })
  }
}

try {
  const value = await (driver === 'mysql2' ? viaMysql2() : viaPostgresjs())
  console.log(JSON.stringify({ ok: true, value }))
} catch (e) {
  console.log(JSON.stringify({ ok: false, code: e.code ?? null, errno: e.errno ?? null, message: String(e.message) }))
}
