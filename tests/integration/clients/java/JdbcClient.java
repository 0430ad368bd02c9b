// The PostgreSQL JDBC driver through the agent: batches, server-side prepared statements,
// binary results, a cursor fetched in pieces, an error and rollback, COPY both ways,
// LISTEN/NOTIFY and a query timeout's cancel. Prints one line per result, to compare with
// a direct run. Usage: java -cp postgresql.jar:. JdbcClient HOST PORT APPLICATION_NAME
import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Timestamp;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class JdbcClient {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/postgres?user=postgres"
                + "&ApplicationName=" + args[2] + "&prepareThreshold=1&sslmode=disable";
        List<String> out = new ArrayList<>();
        try (Connection c = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement()) {
                s.execute("create temp table items (id int primary key, name text, "
                        + "price numeric(10,2), data bytea, at timestamptz)");
            }
            try (PreparedStatement p = c.prepareStatement("insert into items values (?, ?, ?, ?, ?)")) {
                for (int i = 1; i <= 200; i++) {
                    p.setInt(1, i);
                    p.setString(2, "item " + i);
                    p.setBigDecimal(3, new BigDecimal(i).divide(new BigDecimal(4)));
                    p.setBytes(4, new byte[] {(byte) i, 0, (byte) 255});
                    p.setTimestamp(5, new Timestamp(86400000L * i));
                    p.addBatch();
                }
                out.add("batch " + Arrays.stream(p.executeBatch()).sum());
            }
            try (PreparedStatement p = c.prepareStatement(
                    "select name, price, data, at from items where id = ?")) {
                for (int i : new int[] {1, 7, 200}) {
                    p.setInt(1, i);
                    try (ResultSet r = p.executeQuery()) {
                        while (r.next()) {
                            out.add(r.getString(1) + " " + r.getBigDecimal(2) + " "
                                    + Arrays.toString(r.getBytes(3)) + " " + r.getTimestamp(4).getTime());
                        }
                    }
                }
            }
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.setFetchSize(30);  // a portal read 30 rows at a time (PortalSuspended)
                int n = 0;
                long sum = 0;
                try (ResultSet r = s.executeQuery("select id from items order by id")) {
                    while (r.next()) {
                        n++;
                        sum += r.getInt(1);
                    }
                }
                out.add("fetched " + n + " " + sum);
            }
            c.commit();
            try (Statement s = c.createStatement()) {
                s.execute("insert into items (id, name) values (1, 'duplicate')");
                out.add("no error");
            } catch (SQLException e) {
                out.add("error " + e.getSQLState());
                c.rollback();
            }
            c.setAutoCommit(true);
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            StringWriter csv = new StringWriter();
            long copied = copy.copyOut(
                    "copy (select id, name from items where id <= 10 order by id) to stdout (format csv)", csv);
            out.add("copy out " + copied + " " + csv.toString().replace("\n", "|"));
            long loaded = copy.copyIn("copy items (id, name) from stdin (format csv)",
                    new StringReader("1001,x\n1002,y\n"));
            out.add("copy in " + loaded);
            try (Statement s = c.createStatement()) {
                s.execute("listen ringfence_jdbc");
                s.execute("notify ringfence_jdbc, 'hello'");
            }
            PGNotification[] notes = c.unwrap(PGConnection.class).getNotifications(5000);
            out.add("notify " + (notes == null ? "none" : notes[0].getName() + " " + notes[0].getParameter()));
            try (Statement s = c.createStatement()) {
                s.setQueryTimeout(1);  // the driver cancels over a second connection
                s.execute("select pg_sleep(10)");
                out.add("not cancelled");
            } catch (SQLException e) {
                out.add("cancelled " + e.getSQLState());
            }
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select count(*) from items")) {
                r.next();
                out.add("count " + r.getInt(1));
            }
        }
        for (String line : out) {
            System.out.println(line);
        }
    }
}
