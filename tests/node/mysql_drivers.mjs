// mysql2 through the hd MySQL proxy: the scenarios of tests/e2e/test_mysql_drivers.py, one JSON
// document on stdout.   node mysql_drivers.mjs MYSQL_URL [TABLE]
// TLS with the edge verified: the CA file is the connection string's ssl-ca (chain and host name
// checked; rejectUnauthorized stays true).
import fs from 'node:fs'
import mysql from 'mysql2/promise'

const url = new URL(process.argv[2])
const table = process.argv[3] || 'drv_rows'
const options = {
  host: url.hostname.replace(/^\[|\]$/g, ''),
  port: Number(url.port || 3306),
  user: decodeURIComponent(url.username),
  password: decodeURIComponent(url.password),
  database: decodeURIComponent(url.pathname.slice(1)) || undefined,
  connectTimeout: 10000,
  ssl: { ca: fs.readFileSync(url.searchParams.get('ssl-ca')) }
}

async function attempt (fn) {
  try { return { ok: true, value: await fn() } } catch (e) { return { ok: false, code: e.errno, message: e.message } }
}

const conn = await mysql.createConnection(options)
const out = {}
try {
  const [basic] = await conn.query('SELECT 1 + 1 AS two, ? AS echoed, ? AS quoted', [42, "it's"])
  out.basic = { two: Number(basic[0].two), echoed: Number(basic[0].echoed), quoted: basic[0].quoted }
  await conn.query(`DELETE FROM ${table} WHERE driver = 'mysql2'`)
  await conn.beginTransaction()
  await conn.query(`INSERT INTO ${table} (driver, id, v) VALUES ('mysql2', 1, 'rolled back')`)
  await conn.rollback()
  await conn.beginTransaction()
  await conn.query(`INSERT INTO ${table} (driver, id, v) VALUES ('mysql2', 2, 'kept')`)
  await conn.commit()
  const [rows] = await conn.query(`SELECT id, v FROM ${table} WHERE driver = 'mysql2' ORDER BY id`)
  out.transaction = rows.map(r => [r.id, r.v])
  out.error = await attempt(() => conn.query('SELECT * FROM no_such_table'))
  const [large] = await conn.query("SELECT REPEAT('x', 10485760) AS big")
  out.large = large[0].big.length
  out.prepared = await attempt(() => conn.execute('SELECT ? AS x', [1]))
  out.use = await attempt(() => conn.query('USE mysql'))
  out.multi = await attempt(() => conn.query('SELECT 1; SELECT 2'))
  const [after] = await conn.query('SELECT 7 AS seven')
  out.usable = Number(after[0].seven)
} finally {
  await conn.end()
}
console.log(JSON.stringify(out))
