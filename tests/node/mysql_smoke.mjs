// mysql2 against a MySQL/MariaDB server: connect, run a plain query and a prepared statement,
// print one JSON document on stdout.
//   node mysql_smoke.mjs [MYSQL_URL]      (else $MYSQL_URL, e.g. mysql://app:pw@127.0.0.1:3306/app)
// $MYSQL_SSL_CA: a PEM file; when set the connection uses TLS and verifies the server against it.
// Run by tests/e2e/test_mariadb_harness.py (and a template for the MySQL driver tests of issue 7).
import fs from 'node:fs'
import mysql from 'mysql2/promise'

const url = new URL(process.argv[2] || process.env.MYSQL_URL)
const options = {
  host: url.hostname.replace(/^\[|\]$/g, ''),
  port: Number(url.port || 3306),
  user: decodeURIComponent(url.username),
  password: decodeURIComponent(url.password),
  database: decodeURIComponent(url.pathname.slice(1)) || undefined,
  connectTimeout: 10000
}
if (process.env.MYSQL_SSL_CA) {
  options.ssl = { ca: fs.readFileSync(process.env.MYSQL_SSL_CA), rejectUnauthorized: true }
}

const conn = await mysql.createConnection(options)
try {
  const [rows] = await conn.query('SELECT 1 + 1 AS two, CURRENT_USER() AS user, VERSION() AS version, DATABASE() AS db')
  const [prepared] = await conn.execute('SELECT ? AS echoed, CONCAT(?, ?) AS joined', [42, 'a', 'b'])
  const [cipher] = await conn.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
  console.log(JSON.stringify({
    two: Number(rows[0].two),
    user: rows[0].user,
    version: rows[0].version,
    db: rows[0].db,
    echoed: Number(prepared[0].echoed),
    joined: prepared[0].joined,
    ssl_cipher: cipher.length ? cipher[0].Value : '',
    thread_id: conn.threadId
  }))
} finally {
  await conn.end()
}
